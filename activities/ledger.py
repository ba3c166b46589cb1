"""Control-plane activities on Lethe's store: ledger, hold checks, certificates, forget-list."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import activity

from lethe.contracts import Certificate, ForgetListAdd, HoldQuery, LedgerRecord
from lethe.evidence import certificates, forget_list, holds, ledger
from lethe.evidence.store import engine_for
from lethe.kernel.config import current_settings
from lethe.kernel.errors import LetheError


async def _store() -> AsyncEngine:
    return await engine_for(current_settings().store_url.get_secret_value())


@activity.defn(name="ledger.record")
async def record(entries: list[LedgerRecord]) -> list[str]:
    """Append ledger entries in order, in one transaction (each once, whatever the retries);
    their hashes."""
    engine = await _store()
    try:
        return [entry.hash for entry in await ledger.append_many(engine, entries)]
    except LetheError as exc:
        raise exc.to_application_error() from None


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
    """Keep the certificate (once, whatever the retries)."""
    await certificates.keep(
        await _store(), certificate.request_id, certificate.subject_ref, certificate
    )


@activity.defn(name="forget_list.add")
async def remember(entry: ForgetListAdd) -> None:
    """Put an erased subject on the forget-list, sealed, for replay after a restore."""
    try:
        await forget_list.add(
            await _store(),
            subject=entry.subject,
            subject_ref=entry.subject_ref,
            request_id=entry.request_id,
            systems=entry.systems,
            subject_key=current_settings().subject_key_bytes,
        )
    except LetheError as exc:
        raise exc.to_application_error() from None


@activity.defn(name="forget_list.listed")
async def listed(subject_ref: str) -> bool:
    """Whether an earlier erasure put the subject on the forget-list."""
    return await forget_list.listed(await _store(), subject_ref)
