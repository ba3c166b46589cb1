"""Legal holds: place, release, list, and find those that block a step.

A hold's scope is a subject (by reference), a tenant, a system or a category (a hold on a parent
category covers its children). A hold placed for one tenant (a tenant-scope hold is its value's)
blocks that tenant's steps only; one of no tenant blocks every tenant's. Placing and releasing are
written to the ledger, under the hold's tenant. Reads keep to the current tenant scope.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from lethe.classification.taxonomy import matches
from lethe.contracts import Hold, HoldScope
from lethe.evidence import ledger
from lethe.evidence.store import holds, owned, visible
from lethe.kernel.errors import LetheError


class UnknownHold(LetheError):
    """No hold has this id."""


def _hold(row: object) -> Hold:
    fields = dict(row._mapping)  # type: ignore[attr-defined]
    for name in ("placed_at", "released_at"):
        if fields[name] is not None and fields[name].tzinfo is None:
            fields[name] = fields[name].replace(tzinfo=UTC)
    return Hold.model_validate(fields)


async def place(
    engine: AsyncEngine,
    *,
    matter: str,
    scope: HoldScope,
    value: str,
    placed_by: str,
    reason: str,
    tenant: str | None = None,
) -> Hold:
    """Place a hold for `tenant` (None: all tenants; a tenant-scope hold is its value's) and
    record it in the ledger. Under one tenant's scope the hold is that tenant's (OutOfScope for
    another)."""
    tenant = owned(value if scope == "tenant" else tenant, "a legal hold")
    hold = Hold(
        id=f"hold-{uuid.uuid4().hex[:12]}",
        matter=matter,
        scope=scope,
        value=value,
        reason=reason,
        placed_by=placed_by,
        placed_at=datetime.now(UTC),
        tenant=tenant,
    )
    async with engine.begin() as conn:
        await conn.execute(insert(holds).values(**hold.model_dump()))
    await ledger.append(
        engine,
        idempotency_key=f"{hold.id}/placed",
        request_id=hold.id,
        subject_ref=value if scope == "subject" else "-",
        actor=placed_by,
        action="hold.placed",
        details={"matter": matter, "scope": scope, "value": value if scope != "subject" else None},
        tenant=hold.tenant,
    )
    return hold


async def release(engine: AsyncEngine, hold_id: str, *, released_by: str) -> Hold:
    """Release a hold (releasing twice is harmless) and record it in the ledger."""
    now = datetime.now(UTC)
    this = [c for c in (holds.c.id == hold_id, visible(holds)) if c is not None]
    async with engine.begin() as conn:
        await conn.execute(
            update(holds)
            .where(*this, holds.c.released_at.is_(None))
            .values(released_at=now, released_by=released_by)
        )
        row = (await conn.execute(select(holds).where(*this))).first()
    if row is None:
        raise UnknownHold(f"no legal hold has the id {hold_id[:60]!r}")
    hold = _hold(row)
    await ledger.append(
        engine,
        idempotency_key=f"{hold.id}/released",
        request_id=hold.id,
        subject_ref=hold.value if hold.scope == "subject" else "-",
        actor=released_by,
        action="hold.released",
        details={"matter": hold.matter, "scope": hold.scope},
        tenant=hold.tenant,
    )
    return hold


async def list_holds(
    engine: AsyncEngine, *, include_released: bool = False, tenant: str | None = None
) -> list[Hold]:
    """Holds by placement time (those the tenant scope sees), active ones only unless asked,
    those placed for `tenant` only when given."""
    query = select(holds).order_by(holds.c.placed_at)
    if not include_released:
        query = query.where(holds.c.released_at.is_(None))
    for condition in (visible(holds), None if tenant is None else holds.c.tenant == tenant):
        if condition is not None:
            query = query.where(condition)
    async with engine.connect() as conn:
        return [_hold(row) for row in await conn.execute(query)]


def blocks(
    hold: Hold, *, subject_ref: str, tenant: str, system: str, categories: Iterable[str]
) -> bool:
    """True if an active hold covers a step on `system` touching `categories` of this subject
    of `tenant` (a hold placed for another tenant does not)."""
    if not hold.active or hold.tenant not in (None, tenant):
        return False
    if hold.scope == "subject":
        return hold.value == subject_ref
    if hold.scope == "tenant":
        return hold.value == tenant
    if hold.scope == "system":
        return hold.value == system
    return any(matches(hold.value, key) for key in categories)
