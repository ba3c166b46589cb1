"""Closed requests' certificates in Lethe's store: each kept once, by request id, under its
tenant; reads keep to the current tenant scope."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from lethe.contracts import Contract
from lethe.evidence.store import certificates, owned, visible


async def keep(
    engine: AsyncEngine,
    request_id: str,
    subject_ref: str,
    body: Contract,
    tenant: str | None = None,
) -> None:
    """Keep a request's certificate (a single request's, or a bulk request's closing progress
    under reference `-`) under `tenant`, by default the body's; a second call for the same
    request changes nothing."""
    kept_body = body.model_dump(mode="json")
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
                    body=kept_body,
                    tenant=owned(tenant or kept_body.get("tenant"), "a certificate"),
                )
            )


async def read(engine: AsyncEngine, request_id: str) -> dict[str, Any] | None:
    """The certificate kept for `request_id` (its body), if the tenant scope sees it."""
    query = select(certificates.c.body).where(certificates.c.request_id == request_id)
    condition = visible(certificates)
    if condition is not None:
        query = query.where(condition)
    async with engine.connect() as conn:
        row = (await conn.execute(query)).first()
    return None if row is None else dict(row.body)


async def recent(
    engine: AsyncEngine, *, tenant: str | None = None, limit: int = 20
) -> list[dict[str, Any]]:
    """The latest certificates (bodies), newest first: those the tenant scope sees, of `tenant`
    only when given."""
    query = select(certificates.c.body).order_by(certificates.c.issued_at.desc()).limit(limit)
    for condition in (
        visible(certificates),
        None if tenant is None else certificates.c.tenant == tenant,
    ):
        if condition is not None:
            query = query.where(condition)
    async with engine.connect() as conn:
        return [dict(row.body) for row in await conn.execute(query)]
