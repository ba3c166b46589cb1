"""A worker killed in the middle of an erasure: a new one finishes it, and nothing happens twice."""

from __future__ import annotations

import asyncio
from collections import Counter

from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from lethe.contracts import LedgerEntry
from lethe.evidence import ledger
from tests.e2e.conftest import (
    Hospital,
    approve,
    certificate_of,
    erase_and_wait_for_approval,
    kafka_records,
    status_of,
)

HELD_SYSTEM = "session-cache"


async def _ledger(hospital: Hospital, request_id: str) -> list[LedgerEntry]:
    engine = create_async_engine(hospital.store_url)
    try:
        return await ledger.entries(engine, request_id)
    finally:
        await engine.dispose()


async def _deleted_at(hospital: Hospital, patient_id: str) -> object:
    patients, _, _ = hospital.tables()
    engine = create_async_engine(hospital.connections.sql_url)
    try:
        async with engine.connect() as conn:
            return (
                await conn.execute(
                    select(patients.c.deleted_at).where(patients.c.patient_id == patient_id)
                )
            ).scalar_one()
    finally:
        await engine.dispose()


def _tombstones(hospital: Hospital, key: bytes) -> list[tuple[int, int]]:
    records = kafka_records(hospital.connections.kafka_bootstrap, hospital.topic)
    return [(p, o) for p, o, k, v in records if k == key and v is None]


async def test_a_killed_worker_is_replaced_and_the_erasure_completes_once(
    hospital: Hospital,
) -> None:
    """SIGKILL the only worker mid-erasure; a restarted one completes it, each step once.

    "The middle" is made deterministic with a legal hold on one system (the Redis cache): after
    approval the SQL and Kafka steps run, and the erasure waits, durably, in `on_hold` for the
    cache. The worker is killed there (no shutdown, its workflow cache and sticky queue lost),
    a new worker process starts, and the hold is released through the CLI. The new worker must
    rebuild the workflow from history and carry on with the cache and the deferred phase
    without redoing anything: one ledger entry per step, one Kafka tombstone (a second erase
    would write a second one), the soft-delete stamp from before the crash, each step once in
    the certificate. Killing while an activity is in flight would rely on timing, and the
    activity would be retried only after its heartbeat timeout (20 seconds): too slow and too
    flaky for this suite; activities' idempotency is covered by the integration tests.
    """
    ada = hospital.patients[0]
    first = hospital.worker()
    _, placed = await asyncio.gather(
        first.start(),
        hospital.lethe(
            "hold",
            "place",
            "--matter",
            "crash drill",
            "--scope",
            "system",
            "--value",
            HELD_SYSTEM,
            "--reason",
            "hold the cache so the erasure stops half-way",
            "--by",
            "legal",
        ),
    )
    assert placed.code == 0, str(placed)
    hold_id = placed.stdout.strip()
    assert hold_id.startswith("hold-")

    workflow_id = await erase_and_wait_for_approval(hospital, ada)
    await approve(hospital, workflow_id)
    await hospital.wait_for(workflow_id, "on_hold")
    held = await status_of(hospital, workflow_id)
    steps = {s["step_id"]: s for s in held["steps"]}
    assert steps["session-cache/0"]["status"] == "held"
    assert steps["session-cache/0"]["holds"] == [hold_id]
    done_before = {k for k, s in steps.items() if s["status"] == "done"}
    assert {"patients-db/0", "patients-db/1", "patients-db/2"} <= done_before
    assert steps["patient-events/0"]["status"] == "at_risk"  # zero-day window; see test_erasure_cli

    request_id = held["request_id"]
    ledger_before = await _ledger(hospital, request_id)
    stamp_before = await _deleted_at(hospital, ada.patient_id)
    key = f"patient:{ada.patient_id}".encode()
    assert stamp_before is not None
    assert len(await asyncio.to_thread(_tombstones, hospital, key)) == 1

    # `hold release` finds the erasures to wake through visibility, which trails the workflow.
    await hospital.wait_listed(workflow_id, "on_hold")

    await first.kill()
    assert first.process is not None and first.process.returncode == -9
    # The next workflow task goes to the dead worker's sticky queue until the server gives up
    # on it (ten seconds), so the restart and the release can overlap.
    second = hospital.worker()
    _, released = await asyncio.gather(
        second.start(), hospital.lethe("hold", "release", hold_id, "--by", "legal")
    )
    assert released.code == 0, str(released)
    assert f"released {hold_id}" in released.stderr
    await asyncio.wait_for((await hospital.sdk()).result(workflow_id), 120)
    final = await status_of(hospital, workflow_id)
    assert final["state"] == "completed"
    assert all(s["status"] in ("done", "at_risk") for s in final["steps"]), final

    certificate = await certificate_of(hospital, workflow_id)
    step_ids = [s["step_id"] for s in certificate["steps"]]
    assert len(step_ids) == len(set(step_ids)) == 8
    outcomes = {s["step_id"]: s for s in certificate["steps"]}
    assert outcomes["session-cache/0"]["status"] == "done"
    assert outcomes["session-cache/0"]["affected"] == 4  # three keys and one hash field
    assert outcomes["patients-db/0"]["affected"] == 1

    # What ran before the crash was not run again.
    entries = await _ledger(hospital, request_id)
    assert entries[: len(ledger_before)] == ledger_before
    per_step = Counter(e.details.get("step") for e in entries if e.action.startswith("step."))
    assert per_step == Counter(dict.fromkeys(step_ids, 1)), per_step
    actions = Counter(e.action for e in entries if not e.action.startswith("step."))
    assert actions["erasure.requested"] == actions["erasure.approved"] == 1
    assert actions["erasure.started"] == 1
    assert await _deleted_at(hospital, ada.patient_id) == stamp_before
    assert len(await asyncio.to_thread(_tombstones, hospital, key)) == 1
    assert set(certificate["ledger_hashes"]) <= {e.hash for e in entries}

    client: Redis = Redis.from_url(hospital.connections.redis_url)
    try:
        assert await client.exists(f"{hospital.prefix}session:{ada.patient_id}") == 0
        assert await client.hget(f"{hospital.prefix}patients:by-email", ada.email) is None
    finally:
        await client.aclose()

    assert "shutting down" not in first.log_text()  # it was killed, not stopped
    verified = await hospital.lethe("audit", "verify")
    assert verified.code == 0 and "ledger intact" in verified.stdout, str(verified)
