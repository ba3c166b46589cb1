"""Control-plane activities on Lethe's store: ledger entries, hold checks, certificates."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import activity

from lethe import holds, ledger
from lethe.config import load_settings
from lethe.contracts import Certificate, HoldQuery, LedgerRecord
from lethe.errors import LetheError
from lethe.store import certificates, engine_for, forget_list


async def _store() -> AsyncEngine:
    return await engine_for(load_settings().store_url.get_secret_value())


@activity.defn(name="ledger.record")
async def record(entry: LedgerRecord) -> str:
    """Append one ledger entry (once, whatever the retries); return its hash."""
    try:
        written = await ledger.append(await _store(), **entry.model_dump())
    except LetheError as exc:
        raise exc.to_application_error() from None
    return written.hash


@activity.defn(name="holds.blocking")
async def blocking(query: HoldQuery) -> dict[str, list[str]]:
    """For each step an active hold blocks, the ids of the holds that block it."""
    active = await holds.list_holds(await _store())
    found: dict[str, list[str]] = {}
    for step in query.steps:
        if step.action == "retain":
            continue
        categories = [d.category for d in step.decisions if d.category]
        ids = [
            hold.id
            for hold in active
            if holds.blocks(
                hold,
                subject_ref=query.subject_ref,
                tenant=query.tenant,
                system=step.system,
                categories=categories,
            )
        ]
        if ids:
            found[step.id] = ids
    return found


@activity.defn(name="certificate.issue")
async def issue(certificate: Certificate) -> None:
    """Keep the certificate and, for an erasure that ran, put the subject on the forget-list."""
    engine = await _store()
    async with engine.begin() as conn:
        stored = (
            await conn.execute(
                select(certificates.c.request_id).where(
                    certificates.c.request_id == certificate.request_id
                )
            )
        ).first()
        if stored is None:
            await conn.execute(
                insert(certificates).values(
                    request_id=certificate.request_id,
                    subject_ref=certificate.subject_ref,
                    issued_at=datetime.now(UTC),
                    body=certificate.model_dump(mode="json"),
                )
            )
        if certificate.outcome in ("erased", "erased_pending_compaction", "incomplete"):
            listed = (
                await conn.execute(
                    select(forget_list.c.subject_ref).where(
                        forget_list.c.subject_ref == certificate.subject_ref
                    )
                )
            ).first()
            if listed is None:
                await conn.execute(
                    insert(forget_list).values(
                        subject_ref=certificate.subject_ref,
                        tenant=certificate.tenant,
                        request_id=certificate.request_id,
                        systems=sorted({s.system for s in certificate.plan.steps}),
                        erased_at=certificate.completed_at,
                    )
                )
