"""The tenant scope: the context variable, the store's filter and write check, the ledger's hash
with and without a tenant, and holds that block one tenant's steps only."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from lethe.contracts import Hold
from lethe.evidence import holds
from lethe.evidence.ledger import entry_hash
from lethe.evidence.store import OutOfScope, ledger, owned, visible
from lethe.kernel import tenancy

AT = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
# Computed by entry_hash before entries had a tenant (commit 5f598c9): entries written then
# must keep verifying.
OLD_HASH = "a539e49eea1c36cdf43b3c0716af5a2d88bee22775f857d87d6bb2ea16b930b9"


def _hash(tenant: str | None = None) -> str:
    details: dict[str, str | int | float | bool | None] = {"affected": 3, "note": None}
    return entry_hash(
        7, AT, "req-1", "ab" * 16, "dpo", "step.done", "patients-db", details, "cd" * 32, tenant
    )


def test_an_entry_without_a_tenant_hashes_as_before_tenants() -> None:
    assert _hash() == OLD_HASH


def test_the_tenant_is_covered_by_the_hash() -> None:
    assert len({_hash("st-mary"), _hash("st-luke"), OLD_HASH}) == 3


def test_a_scope_is_set_for_its_block_and_nests() -> None:
    assert tenancy.current() is None
    with tenancy.scoped("st-mary"):
        assert (tenancy.current(), tenancy.tenant_only()) == ("st-mary", "st-mary")
        with tenancy.scoped(tenancy.ALL):
            assert (tenancy.current(), tenancy.tenant_only()) == ("*", None)
        assert tenancy.current() == "st-mary"
    assert tenancy.current() is None
    with pytest.raises(ValueError, match="needs a tenant"), tenancy.scoped(""):
        pass


async def test_tasks_started_under_a_scope_keep_it() -> None:
    with tenancy.scoped("st-mary"):
        seen = await asyncio.create_task(_scope_now())
    assert seen == "st-mary"
    assert await asyncio.create_task(_scope_now()) is None


async def _scope_now() -> str | None:
    await asyncio.sleep(0)
    return tenancy.current()


def test_reads_are_filtered_under_one_tenant_only() -> None:
    assert visible(ledger) is None
    with tenancy.scoped(tenancy.ALL):
        assert visible(ledger) is None
    with tenancy.scoped("st-mary"):
        condition = visible(ledger)
        assert condition is not None
        compiled = condition.compile(compile_kwargs={"literal_binds": True})
        assert str(compiled) == "lethe_ledger.tenant = 'st-mary'"


def test_writes_under_a_tenant_scope_are_that_tenants() -> None:
    assert owned(None, "a hold") is None
    assert owned("st-luke", "a hold") == "st-luke"
    with tenancy.scoped("st-mary"):
        assert owned(None, "a hold") == "st-mary"
        assert owned("st-mary", "a hold") == "st-mary"
        with pytest.raises(OutOfScope, match="a hold for another tenant is refused"):
            owned("st-luke", "a hold")
    with tenancy.scoped(tenancy.ALL):
        assert owned(None, "a hold") is None


def _hold(tenant: str | None) -> Hold:
    return Hold(
        id="hold-1",
        matter="m",
        scope="system",
        value="patients-db",
        placed_by="counsel",
        placed_at=AT,
        tenant=tenant,
    )


@pytest.mark.parametrize(
    ("hold_tenant", "step_tenant", "blocked"),
    [("st-mary", "st-mary", True), ("st-mary", "st-luke", False), (None, "st-luke", True)],
)
def test_a_hold_for_one_tenant_blocks_that_tenants_steps_only(
    hold_tenant: str | None, step_tenant: str, blocked: bool
) -> None:
    found = holds.blocks(
        _hold(hold_tenant),
        subject_ref="ab" * 16,
        tenant=step_tenant,
        system="patients-db",
        categories=[],
    )
    assert found is blocked
