"""The raw floor's SQL: what the SQL connector's `erase_batch` runs for one table and a batch,
done directly. Per table, in a transaction of its own: the batch's rows read and locked (SELECT
... FOR UPDATE, with whether each still needs changing), one UPDATE for the batch, commit; then
the verification read: per subject, rows matching and rows failing each check (GROUP BY)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Table, and_, case, func, not_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import FromClause

from bench import BenchError
from bench.erasure_parts.sample_data import SqlTables


@dataclass(frozen=True)
class TableWork:
    """One table's step: what to set, the checks of an erased row, and how rows are found."""

    table: Table
    values: dict[str, object]
    checks: list[ColumnElement[bool]]
    owner: Any
    """The column holding the subject's id (on the table, or along the join)."""
    source: FromClause

    def found_by(self, ids: list[str]) -> ColumnElement[bool]:
        """The batch's rows."""
        return self.owner.in_(ids)  # type: ignore[no-any-return]

    def pending(self) -> ColumnElement[bool]:
        """A row not yet in the erased state."""
        return not_(and_(*self.checks))


def table_work(tables: SqlTables, now: datetime) -> list[TableWork]:
    """The three tables' steps as the bench's data map and policy plan them."""
    patients, appointments, labs = tables.patients, tables.appointments, tables.labs
    cleared = ["full_name", "email", "phone", "date_of_birth", "mrn"]
    path = appointments.alias("lethe_path_1")
    return [
        TableWork(
            patients,
            {**dict.fromkeys(cleared), "deleted_at": func.coalesce(patients.c.deleted_at, now)},
            [patients.c.deleted_at.is_not(None), *(patients.c[c].is_(None) for c in cleared)],
            patients.c.patient_id,
            patients,
        ),
        TableWork(
            appointments,
            {"notes": None},
            [appointments.c.notes.is_(None)],
            appointments.c.patient_id,
            appointments,
        ),
        TableWork(
            labs,
            {"result": None},
            [labs.c.result.is_(None)],
            path.c.patient_id,
            labs.join(path, labs.c.appointment_id == path.c.id),
        ),
    ]


def _match(work: TableWork, ids: list[str]) -> ColumnElement[bool]:
    """The batch's rows of the table itself (through the join's keys for a joined table)."""
    if work.source is work.table:
        return work.found_by(ids)
    inner = select(work.table.c.id).select_from(work.source).where(work.found_by(ids))
    return work.table.c.id.in_(inner)


async def erase_table(engine: AsyncEngine, work: TableWork, ids: list[str]) -> int:
    """Lock the batch's rows, change the pending ones with one UPDATE, commit: rows changed."""
    async with engine.connect() as conn:
        pending_flag = case((work.pending(), 1), else_=0)
        found = await conn.execute(
            select(work.owner, work.table.primary_key.columns.values()[0], pending_flag)
            .select_from(work.source)
            .where(work.found_by(ids))
            .with_for_update(of=work.table)
        )
        pending = sum(int(row[2]) for row in found.all())
        changed = 0
        if pending:
            result = await conn.execute(
                update(work.table).where(_match(work, ids) & work.pending()).values(work.values)
            )
            changed = max(result.rowcount, 0)
        await conn.commit()
    if changed != pending:
        raise BenchError(f"floor: {changed} of {pending} rows changed in {work.table.name}")
    return changed


async def verify_table(engine: AsyncEngine, work: TableWork, ids: list[str]) -> int:
    """Per subject: rows matching and failing each check (one query); subjects failing."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(
                work.owner,
                func.count(),
                *(func.coalesce(func.sum(case((ok, 0), else_=1)), 0) for ok in work.checks),
            )
            .select_from(work.source)
            .where(work.found_by(ids))
            .group_by(work.owner)
        )
        return sum(1 for row in rows.all() if any(int(n) for n in row[2:]))
