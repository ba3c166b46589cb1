"""A tenant leaves the platform: `lethe offboard` on the real stack, and each system's own
client shows that tenant's data gone and the other tenant's untouched.

Two clinics of the run share a PostgreSQL table (told apart by a `clinic` column, with the same
patient ids in both) and a Redis keyspace (keys carry the clinic). `lethe offboard` finds St
Luke's patients in both (reading only), stops for the DPO with the counts, and after `lethe bulk
approve` erases them; St Mary's rows and keys are byte-identical afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select
from sqlalchemy.ext.asyncio import create_async_engine

from lethe.sdk import bulk as bulk_sdk
from tests.e2e.conftest import Hospital, WorkerProcess

PATIENTS = 1
"""The seeded hospital is not used here: only its region, queues and store."""
ROWS = 240


def _datamap(hospital: Hospital, table: str) -> str:
    return f"""
version: 1
regions: [{hospital.region}]
tenants:
  {hospital.tenant}: {{region: {hospital.region}}}
  {_luke(hospital)}: {{region: {hospital.region}}}
systems:
  - name: members-db
    kind: sql
    region: {hospital.region}
    connection: LETHE_STACK_SQL_URL
    tables:
      - table: {table}
        subject_column: patient_id
        tenant_column: clinic
        identities: {{email: email}}
        columns:
          email: user.unique_id
  - name: member-cache
    kind: redis
    region: {hospital.region}
    connection: LETHE_STACK_REDIS_URL
    keys:
      - patterns: ["{hospital.prefix}{{tenant}}:session:{{subject_id}}"]
        categories: [user.account]
"""


def _luke(hospital: Hospital) -> str:
    return f"st-luke-{hospital.suffix}"


def _members(hospital: Hospital) -> Table:
    return Table(
        f"off_{hospital.suffix}_members",
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("clinic", String(40), nullable=False),
        Column("patient_id", String(64), nullable=False),
        Column("email", String(200)),
    )


@pytest.fixture(scope="module")
async def clinics(hospital: Hospital) -> AsyncIterator[Table]:
    """The two clinics' rows and keys, and the data map naming them."""
    members = _members(hospital)
    engine = create_async_engine(hospital.connections.sql_url)
    rows = [
        {
            "id": n,
            "clinic": _luke(hospital) if n % 2 else hospital.tenant,
            "patient_id": f"m-{n // 2}",  # the same ids in both clinics: other people
            "email": f"m{n}@example.org",
        }
        for n in range(ROWS)
    ]
    redis: Redis = Redis.from_url(hospital.connections.redis_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(members.metadata.create_all)
            await conn.execute(insert(members), rows)
        await redis.mset(
            {f"{hospital.prefix}{r['clinic']}:session:{r['patient_id']}": b"s" for r in rows}
        )
        hospital.datamap.write_text(_datamap(hospital, members.name))
        yield members
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(members.metadata.drop_all)
        await engine.dispose()
        await redis.aclose()


async def _sql(hospital: Hospital, members: Table) -> list[tuple[Any, ...]]:
    engine = create_async_engine(hospital.connections.sql_url)
    try:
        async with engine.connect() as conn:
            return sorted(tuple(r) for r in await conn.execute(select(members)))
    finally:
        await engine.dispose()


async def _keys(hospital: Hospital) -> dict[bytes, bytes | None]:
    redis: Redis = Redis.from_url(hospital.connections.redis_url)
    try:
        keys = [k async for k in redis.scan_iter(match=f"{hospital.prefix}*", count=1000)]
        return {k: await redis.dump(k) for k in keys}  # any type, byte for byte
    finally:
        await redis.aclose()


@pytest.mark.timeout(300)
async def test_offboarding_erases_one_tenant_and_leaves_the_other_byte_identical(
    hospital: Hospital, clinics: Table
) -> None:
    worker: WorkerProcess = hospital.worker()
    await worker.start()
    rows_before, keys_before = await _sql(hospital, clinics), await _keys(hospital)
    luke = _luke(hospital)
    started = await hospital.lethe("offboard", "--tenant", luke, "--by", "dpo", "--json")
    assert started.code == 0, str(started)
    shown = started.json()
    assert shown["state"] == "awaiting_approval"
    assert shown["discovered"] == {"members-db/0": ROWS // 2, "member-cache/0": ROWS // 2}
    assert shown["counts"]["total"] == ROWS // 2  # found in both, staged once
    assert f"lethe bulk approve {shown['bulk_id']}" in started.stderr
    assert await _sql(hospital, clinics) == rows_before  # nothing destroyed before approval
    assert await _keys(hospital) == keys_before

    approved = await hospital.lethe("bulk", "approve", shown["bulk_id"], "--by", "dpo")
    assert approved.code == 0, str(approved)
    client = await hospital.sdk()
    async with asyncio.timeout(180):
        done = await bulk_sdk.follow(client, shown["bulk_id"], every=0.5)
    assert done.state == "completed" and done.counts.erased == ROWS // 2

    mary = hospital.tenant
    assert await _sql(hospital, clinics) == [r for r in rows_before if r[1] == mary]
    assert await _keys(hospital) == {
        k: v
        for k, v in keys_before.items()
        if not k.startswith(f"{hospital.prefix}{luke}:".encode())
    }
    verified = await hospital.lethe("audit", "verify")
    assert verified.code == 0, str(verified)
    await worker.stop()
