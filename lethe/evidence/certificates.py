"""Closed requests' certificates in Lethe's store: each kept once, by request id."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from lethe.contracts import Contract
from lethe.evidence.store import certificates


async def keep(engine: AsyncEngine, request_id: str, subject_ref: str, body: Contract) -> None:
    """Keep a request's certificate (a single request's, or a bulk request's closing progress
    under reference `-`); a second call for the same request changes nothing."""
    async with engine.begin() as conn:
        kept = await conn.execute(
            select(certificates.c.request_id).where(certificates.c.request_id == request_id)
        )
        if kept.first() is None:
            await conn.execute(
                insert(certificates).values(
                    request_id=request_id,
                    subject_ref=subject_ref,
                    issued_at=datetime.now(UTC),
                    body=body.model_dump(mode="json"),
                )
            )
