"""Plans scoped by tenant and region: a subject's plan holds only the systems that hold them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import Column, DateTime, MetaData, String, Table, insert, select
from sqlalchemy.ext.asyncio import create_async_engine

from lethe.activities.sql import SqlEraser
from lethe.classification.datamap import SqlTableLocator, load_datamap
from lethe.classification.routing import NoSystemHoldsTenant, RegionContradiction
from lethe.contracts import ErasureRequest, Plan, Subject
from lethe.kernel.yamlfile import InvalidFile
from lethe.plans.planner import Planner, PlanningFailed
from lethe.policies.model import PACKS_DIR, load_pack
from tests.steps import step_request

REF = "0" * 32
GDPR = load_pack(PACKS_DIR / "gdpr.yaml")
MAP = """\
version: 1
regions: [eu, us]
tenants:
  clinic-eu: {region: eu}
  clinic-us: {region: us}
  shared-eu: {region: eu}
systems:
  - name: members-eu
    kind: sql
    region: eu
    connection: EU_SQL
    tenants: [clinic-eu, shared-eu]
    tables:
      - table: members
        subject_column: member_no
        tenant_column: tenant
        soft_delete_column: deleted_at
        columns: {email: user.contact.email}
  - name: events-eu
    kind: kafka
    region: eu
    connection: EU_KAFKA
    topics:
      - topic: member-events
        key_template: "{tenant}:{subject_id}"
        categories: [user.contact]
  - name: members-us
    kind: sql
    region: us
    connection: US_SQL
    tables:
      - table: members
        subject_column: member_no
        soft_delete_column: deleted_at
        columns: {email: user.contact.email}
  - name: cache-us
    kind: redis
    region: us
    connection: US_REDIS
    keys:
      - patterns: ["member:{subject_id}"]
        categories: [user.contact]
  - name: backups-eu
    kind: blob
    region: eu
    connection: EU_BLOB
    backups:
      - container: db-backups
        whole_backup_prefix: "members-eu/"
        categories: [user]
        backup_of: members-eu
      - container: us-db-backups
        whole_backup_prefix: "members-us/"
        categories: [user]
        backup_of: members-us
"""


def _map(tmp_path: Path, text: str = MAP) -> Path:
    path = tmp_path / "map.yaml"
    path.write_text(text)
    return path


def _plan(tmp_path: Path, tenant: str, text: str = MAP, **fields: object) -> Plan:
    planner = Planner(load_datamap(_map(tmp_path, text)), GDPR, "digest")
    request = ErasureRequest(
        subject=Subject(tenant=tenant, subject_id="m-1"), requested_by="dpo", **fields
    )
    return planner.plan(request, "req-1", REF)


def test_an_eu_subject_plans_only_eu_systems_that_hold_their_tenant(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "clinic-eu")
    assert [r.region for r in plan.regions] == ["eu"]
    assert sorted({s.system for s in plan.steps}) == ["backups-eu", "events-eu", "members-eu"]
    # Whole backups of the US database are not this subject's business.
    backups = [s for s in plan.steps if s.system == "backups-eu"]
    assert [s.id for s in backups] == ["backups-eu/0"]


def test_a_us_subject_plans_only_us_systems(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "clinic-us")
    assert [r.region for r in plan.regions] == ["us"]
    assert sorted({s.system for s in plan.steps}) == ["cache-us", "members-us"]


def test_a_system_may_hold_a_tenant_of_another_region_when_the_map_says_so(
    tmp_path: Path,
) -> None:
    text = MAP.replace(
        "    connection: US_REDIS\n", "    connection: US_REDIS\n    tenants: [clinic-eu]\n"
    )
    plan = _plan(tmp_path, "clinic-eu", text)
    assert [r.region for r in plan.regions] == ["eu", "us"]
    assert "cache-us" in {s.system for s in plan.steps}
    assert "cache-us" not in {s.system for s in _plan(tmp_path, "clinic-us", text).steps}


def test_a_region_that_contradicts_the_tenant_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RegionContradiction, match="lives in region 'eu', not 'us'"):
        _plan(tmp_path, "clinic-eu", region="us")
    assert _plan(tmp_path, "clinic-eu", region="eu").home_region == "eu"


def test_a_tenant_no_system_holds_cannot_be_planned(tmp_path: Path) -> None:
    text = MAP.replace("tenants: [clinic-eu, shared-eu]", "tenants: [clinic-eu]").replace(
        "    connection: EU_KAFKA\n", "    connection: EU_KAFKA\n    tenants: [clinic-eu]\n"
    )
    with pytest.raises(NoSystemHoldsTenant, match="no system of the data map holds subjects"):
        _plan(tmp_path, "shared-eu", text)
    with pytest.raises(PlanningFailed, match="none of the systems cache-us holds"):
        _plan(tmp_path, "clinic-eu", systems=["cache-us"])


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("        tenant_column: tenant\n", "", "table 'members' does not tell them apart"),
        ('"{tenant}:{subject_id}"', '"m:{subject_id}"', "key template of topic 'member-events'"),
        ("tenants: [clinic-eu, shared-eu]", "tenants: [clinic-eu, nobody]", "tenant(s) nobody"),
        ("        backup_of: members-eu\n", "", "whole backups need backup_of"),
        ("backup_of: members-us", "backup_of: ledger", "'ledger' is not a system"),
    ],
)
def test_maps_that_would_cross_tenants_are_refused(
    tmp_path: Path, old: str, new: str, problem: str
) -> None:
    assert old in MAP
    with pytest.raises(InvalidFile, match=re.escape(problem)):
        load_datamap(_map(tmp_path, MAP.replace(old, new)))


def test_a_shared_redis_without_tenant_in_its_keys_is_refused(tmp_path: Path) -> None:
    text = MAP.replace(
        "    connection: US_REDIS\n",
        "    connection: US_REDIS\n    tenants: [clinic-us, clinic-eu]\n",
    )
    with pytest.raises(InvalidFile, match="a pattern of keys\\[0\\] does not tell them apart"):
        load_datamap(_map(tmp_path, text))


# --- the SQL connector filters on the tenant column -------------------------------------------

members = Table(
    "members",
    MetaData(),
    Column("member_no", String(20), nullable=False),
    Column("tenant", String(40), nullable=False),
    Column("email", String(200)),
    Column("deleted_at", DateTime),
)


async def test_a_shared_table_is_erased_only_for_the_subjects_tenant(tmp_path: Path) -> None:
    """Two tenants each have a member `m-1`: erasing one leaves the other's row untouched."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'members.db'}")
    async with engine.begin() as conn:
        await conn.run_sync(members.metadata.create_all)
        await conn.execute(
            insert(members),
            [
                {"member_no": "m-1", "tenant": "clinic-eu", "email": "a@eu.example"},
                {"member_no": "m-1", "tenant": "shared-eu", "email": "b@eu.example"},
            ],
        )
    plan = _plan(tmp_path, "clinic-eu")
    step = next(s for s in plan.steps if s.system == "members-eu")
    assert isinstance(step.locator, SqlTableLocator)
    request = step_request(
        step, subject=Subject(tenant="clinic-eu", subject_id="m-1"), subject_ref=REF
    )
    eraser = SqlEraser(engine)
    erased = await eraser.erase(request)
    assert erased.affected == 1
    assert (await eraser.verify(request, erased)).status == "done"
    async with engine.connect() as conn:
        rows = sorted(
            tuple(row) for row in await conn.execute(select(members.c.tenant, members.c.email))
        )
    assert rows == [("clinic-eu", None), ("shared-eu", "b@eu.example")]
    await engine.dispose()
