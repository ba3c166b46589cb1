"""Retention sweep reports in Lethe's store: kept once when a sweep closes, read by run id.

A sweep spans tenants, so its report is of no one tenant: under one tenant's scope none shows.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from lethe.contracts import SweepReport
from lethe.evidence.store import sweep_reports, visible
from lethe.kernel.errors import LetheError


class UnknownSweep(LetheError):
    """No sweep report has this run id."""


async def keep(engine: AsyncEngine, report: SweepReport) -> None:
    """Store a closed sweep's report (a second call for the same run changes nothing)."""
    async with engine.begin() as conn:
        found = await conn.execute(
            select(sweep_reports.c.run_id).where(sweep_reports.c.run_id == report.run_id)
        )
        if found.first() is None:
            await conn.execute(
                insert(sweep_reports).values(
                    run_id=report.run_id,
                    started_at=report.started_at,
                    finished_at=report.finished_at or datetime.now(UTC),
                    dry_run=report.dry_run,
                    body=report.model_dump(mode="json"),
                    tenant=None,
                )
            )


def _in_scope(query: Select[tuple[Any]]) -> Select[tuple[Any]]:
    condition = visible(sweep_reports)
    return query if condition is None else query.where(condition)


async def read(engine: AsyncEngine, run_id: str) -> SweepReport:
    """The report of sweep `run_id`; UnknownSweep when none is kept."""
    query = _in_scope(select(sweep_reports.c.body).where(sweep_reports.c.run_id == run_id))
    async with engine.connect() as conn:
        row = (await conn.execute(query)).first()
    if row is None:
        raise UnknownSweep(
            f"no sweep report is kept for {run_id[:100]!r}: a sweep keeps its report when it "
            "closes (`lethe retention status` lists the running ones)"
        )
    return SweepReport.model_validate(row.body)


async def recent(engine: AsyncEngine, limit: int = 20) -> list[SweepReport]:
    """The latest sweep reports, newest first."""
    query = select(sweep_reports.c.body).order_by(sweep_reports.c.started_at.desc()).limit(limit)
    query = _in_scope(query)
    async with engine.connect() as conn:
        return [SweepReport.model_validate(row.body) for row in await conn.execute(query)]
