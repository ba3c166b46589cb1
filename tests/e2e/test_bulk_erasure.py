"""A DPO erases many patients at once through the `lethe` CLI, on the real stack, and every
system's own client checks the result.

The sample hospital is seeded with `PATIENTS` patients in PostgreSQL, Kafka, Redis and Azurite;
a worker process serves the run's region and control queue. The DPO hands `lethe erase
--subjects-file` a CSV of most of them (id and email); a legal hold covers 1% of those. Approved,
the bulk request erases in batches; the held patients wait until the hold is released. Then:
every targeted patient is gone from each system (as the end-to-end pack decides: soft-deleted,
pseudonymised, tombstoned, purged, backups deleted, logs redacted), every other patient's data is
byte-identical, sampled patients' Merkle proofs hold, and `lethe audit verify` checks the roots.
A worker killed mid-bulk leaves every SQL row changed once (a trigger logs each change).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from lethe.evidence.store import bulk_subjects, engine_for
from lethe.examples.seed import (
    BACKUPS_CONTAINER,
    EXPORTS_CONTAINER,
    LOG_PREFIX,
    LOGS_CONTAINER,
    Patient,
    export_blob_name,
)
from lethe.sdk import bulk as bulk_sdk
from tests.e2e.conftest import HERE, CliResult, Footprint, Hospital, WorkerProcess, footprint
from tests.e2e.test_erasure_completed import register_on

PATIENTS = 330
"""Patients seeded for this module (the e2e conftest reads it)."""
KILLED = 50
"""Patients of the worker-kill test, after the first test's; the last 30 are the re-check's."""
TARGETS = 250
REDACTED = "[redacted]"


def _subjects_file(hospital: Hospital, patients: list[Patient], name: str) -> Path:
    path = hospital.workdir / name
    path.write_text("subject_id,email\n" + "".join(f"{p.patient_id},{p.email}\n" for p in patients))
    return path


async def _bulk_status(hospital: Hospital, bulk_id: str) -> dict[str, Any]:
    result = await hospital.lethe("bulk", "status", bulk_id, "--json")
    assert result.code == 0, str(result)
    found: dict[str, Any] = result.json()
    return found


async def _wait_for(
    hospital: Hospital, bulk_id: str, state: str, timeout: float = 240
) -> dict[str, Any]:
    client = await hospital.sdk()
    async with asyncio.timeout(timeout):
        while (current := await bulk_sdk.progress(client, bulk_id)).state != state:
            assert current.state not in ("cancelled", "rejected"), current
            await asyncio.sleep(0.5)
    return await _bulk_status(hospital, bulk_id)


def _bulk_id(result: CliResult) -> str:
    assert result.code == 0, str(result)
    line = next(line for line in result.stderr.splitlines() if "bulk erasure request" in line)
    return line.split()[-1]


async def test_a_dpo_erases_many_patients_at_once_and_each_system_agrees(
    hospital: Hospital, worker: WorkerProcess
) -> None:
    """Bulk request by file, approval, a 1% hold, release; then each system's own client."""
    targets = hospital.patients[:TARGETS]
    others = hospital.patients[TARGETS:]
    before = await footprint(hospital)
    held = targets[:3]  # 1% of the file, more or less
    client = await hospital.sdk()
    for patient in held:
        placed = await hospital.lethe(
            "hold", "place", "--matter", "case 7", "--scope", "subject",
            "--tenant", hospital.tenant, "--subject", patient.patient_id,
            "--by", "legal", "--reason", "litigation",
        )  # fmt: skip
        assert placed.code == 0, str(placed)

    started = await hospital.lethe(
        "erase", "--tenant", hospital.tenant,
        "--subjects-file", str(_subjects_file(hospital, targets, "subjects.csv")),
        "--reason", "the clinic closes", "--by", "clerk", "--batch-size", "60",
        timeout=120,
    )  # fmt: skip
    bulk_id = _bulk_id(started)
    assert f"lethe bulk approve {bulk_id}" in started.stderr  # the e2e pack wants approval
    for patient in targets:  # no subject id, and nothing of the file, reaches the output
        assert patient.patient_id not in started.stdout + started.stderr
    approved = await hospital.lethe("bulk", "approve", bulk_id, "--by", "dpo")
    assert approved.code == 0, str(approved)

    waiting = await _wait_for(hospital, bulk_id, "on_hold")
    counts = waiting["counts"]
    assert counts["held"] == len(held), json.dumps(waiting["counts"])
    # Kafka is `at_risk` with a zero-day window (its removal cannot be proven by the window's
    # end), so the subjects are `incomplete`: honest, not `erased`.
    assert counts["incomplete"] + counts["erased"] == TARGETS - len(held), json.dumps(waiting)
    assert counts["failed"] == 0
    holds = await client.list_holds()
    for hold in holds:
        await client.release_hold(hold.id, released_by="legal")
    done = await _wait_for(hospital, bulk_id, "completed")
    assert done["counts"]["total"] == TARGETS and done["counts"]["held"] == 0
    assert done["counts"]["erased"] + done["counts"]["incomplete"] == TARGETS
    statuses = {step["step_id"]: step["statuses"] for step in done["steps"]}
    assert statuses["patient-events/0"] == {"at_risk": TARGETS}
    assert all(set(s) == {"done"} for k, s in statuses.items() if k != "patient-events/0")

    after = await footprint(hospital)
    _check_sql(hospital, targets, before, after)
    _check_redis(hospital, targets, before, after)
    _check_kafka(targets, before, after)
    _check_blobs(hospital, targets, before, after)
    assert {p.patient_id for p in others}  # and every check above kept them byte-identical

    for patient in (targets[0], targets[100], held[0]):
        proof = await hospital.lethe(
            "certificate", "--tenant", hospital.tenant, "--subject", patient.patient_id
        )
        assert proof.code == 0, str(proof)
        assert "holds" in proof.stdout and "BROKEN" not in proof.stdout
        assert patient.patient_id not in proof.stdout
    certificate = await hospital.lethe("certificate", bulk_id, "--json")
    assert certificate.code == 0, str(certificate)
    body = certificate.json()
    assert body["counts"] == done["counts"] and body["batches"] == len(body["batch_roots"])
    assert sum(r["size"] for r in body["batch_roots"] if r["phase"] == "immediate") == (
        (TARGETS - len(held)) * 5  # five immediate steps a subject; the held ones came later
    )
    verified = await hospital.lethe("audit", "verify")
    assert verified.code == 0, str(verified)


def _check_sql(
    hospital: Hospital, targets: list[Patient], before: Footprint, after: Footprint
) -> None:
    """Targets soft-deleted and cleared, their visits and results pseudonymised; others' rows
    exactly as seeded; no row removed."""
    patients, appointments, lab_results = hospital.tables()
    ids = {p.patient_id for p in targets}
    visits = {a.id for p in targets for a in p.appointments}
    theirs: dict[str, Callable[[tuple[Any, ...]], bool]] = {
        patients.name: lambda r: r[0] in ids,
        appointments.name: lambda r: r[1] in ids,
        lab_results.name: lambda r: r[1] in visits,
    }
    for table, is_theirs in theirs.items():
        assert len(before.sql[table]) == len(after.sql[table]), table
        assert [r for r in before.sql[table] if not is_theirs(r)] == [
            r for r in after.sql[table] if not is_theirs(r)
        ], table
    rows = [r for r in after.sql[patients.name] if r[0] in ids]
    assert len(rows) == len(targets)
    assert all(r[1:3] == ("erased", "erased@erased.invalid") for r in rows)


def _check_redis(
    hospital: Hospital, targets: list[Patient], before: Footprint, after: Footprint
) -> None:
    prefix = hospital.prefix
    index = f"{prefix}patients:by-email"
    theirs = {
        key
        for p in targets
        for key in (
            f"{prefix}patient:{p.patient_id}:profile",
            f"{prefix}patient:{p.patient_id}:visits",
            f"{prefix}session:{p.patient_id}",
        )
    }
    assert theirs <= set(before.redis) and not theirs & set(after.redis)
    emails = {p.email for p in targets}
    assert after.redis[index] == {k: v for k, v in before.redis[index].items() if k not in emails}
    assert {k: v for k, v in before.redis.items() if k not in theirs and k != index} == {
        k: v for k, v in after.redis.items() if k != index
    }


def _check_kafka(targets: list[Patient], before: Footprint, after: Footprint) -> None:
    """Each target's key ends in its one tombstone (or, compacted away, is gone); every other
    key's latest record is the one it had (the topic compacts, so older records may go)."""
    keys = {f"patient:{p.patient_id}".encode() for p in targets}
    latest_before = {r[2]: r for r in before.kafka}
    latest_after = {r[2]: r for r in after.kafka}
    for key, record in latest_before.items():
        if key in keys:
            assert key not in latest_after or latest_after[key][3] is None
            assert sum(1 for r in after.kafka if r[2] == key and r[3] is None) <= 1
        else:
            assert latest_after[key] == record
    new = [r for r in after.kafka if r not in before.kafka]
    assert all(r[2] in keys and r[3] is None for r in new)  # Lethe wrote tombstones only


def _check_blobs(
    hospital: Hospital, targets: list[Patient], before: Footprint, after: Footprint
) -> None:
    exports = {f"{EXPORTS_CONTAINER}/{export_blob_name(hospital.ref(p))}" for p in targets}
    assert exports <= set(before.blobs) and not exports & set(after.blobs)
    for name, content in before.blobs.items():
        if name.startswith(EXPORTS_CONTAINER) and name not in exports:
            assert after.blobs[name] == content and after.tags[name] == before.tags[name]
    assert not [k for k in after.blobs if k.startswith(BACKUPS_CONTAINER)]  # whole backups gone
    ids = {p.patient_id for p in targets}
    logs = sorted(k for k in before.blobs if k.startswith(f"{LOGS_CONTAINER}/{LOG_PREFIX}"))
    assert logs == sorted(k for k in after.blobs if k.startswith(LOGS_CONTAINER))
    for name in logs:
        old = before.blobs[name].decode().splitlines()
        new = after.blobs[name].decode().splitlines()
        assert len(old) == len(new)
        for was, now in zip(old, new, strict=True):
            record = json.loads(was)
            if record.get("patient_id") in ids:
                assert json.loads(now)["patient_id"] == REDACTED
            else:
                assert now == was


TRIGGER = """
CREATE TABLE IF NOT EXISTS {log} (at timestamptz DEFAULT now(), tbl text, op text, id text);
CREATE OR REPLACE FUNCTION {log}_fn() RETURNS trigger AS $$
BEGIN
  INSERT INTO {log} (tbl, op, id) VALUES (TG_TABLE_NAME, TG_OP, OLD.{key}::text);
  RETURN NULL;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER {log}_trg AFTER UPDATE OR DELETE ON {table}
  FOR EACH ROW EXECUTE FUNCTION {log}_fn();
"""


@pytest.mark.timeout(600)
async def test_a_worker_killed_mid_bulk_changes_each_row_once(
    hospital: Hospital, worker: WorkerProcess
) -> None:
    """SIGKILL the worker while batches run; a new worker finishes the request; a trigger on
    the patients table shows each row updated once, whatever ran twice."""
    await worker.stop()  # this test runs its own workers
    patients, _, _ = hospital.tables()
    log = f"{patients.name}_changes"
    dsn = make_url(hospital.connections.sql_url).set(drivername="postgresql")
    dsn_text = dsn.render_as_string(hide_password=False)
    async with await psycopg.AsyncConnection.connect(dsn_text, autocommit=True) as conn:
        await conn.execute(TRIGGER.format(log=log, table=patients.name, key="patient_id"))
    targets = hospital.patients[TARGETS : TARGETS + KILLED]  # left alone by the first test
    first = hospital.worker()
    await first.start()
    started = await hospital.lethe(
        "erase", "--tenant", hospital.tenant,
        "--subjects-file", str(_subjects_file(hospital, targets, "rest.csv")),
        "--by", "clerk", "--batch-size", "5", "--no-wait",
    )  # fmt: skip
    bulk_id = _bulk_id(started)
    approved = await hospital.lethe("bulk", "approve", bulk_id, "--by", "dpo")
    assert approved.code == 0, str(approved)
    client = await hospital.sdk()
    async with asyncio.timeout(120):
        while (await bulk_sdk.progress(client, bulk_id)).batches < 2:  # noqa: ASYNC110 - polling a query
            await asyncio.sleep(0.05)
    await first.kill()
    second = hospital.worker()
    await second.start()
    done = await _wait_for(hospital, bulk_id, "completed")
    await second.stop()
    counts = done["counts"]
    assert counts["erased"] + counts["incomplete"] == len(targets)  # Kafka: at_risk, see above
    async with await psycopg.AsyncConnection.connect(dsn_text, autocommit=True) as conn:
        rows = await (await conn.execute(f"SELECT id, op FROM {log}")).fetchall()
    changed = [row[0] for row in rows if row[0] in {p.patient_id for p in targets}]
    assert sorted(changed) == sorted(p.patient_id for p in targets)  # each exactly once
    redis: Redis = Redis.from_url(hospital.connections.redis_url)
    try:
        assert (
            await redis.exists(*(f"{hospital.prefix}session:{p.patient_id}" for p in targets)) == 0
        )
    finally:
        await redis.aclose()


async def _bulk_rows(hospital: Hospital) -> int:
    """Subjects staged in the hospital's store, over every bulk request."""
    engine = await engine_for(hospital.store_url)
    async with engine.connect() as conn:
        return int(
            (await conn.execute(select(func.count()).select_from(bulk_subjects))).scalar_one()
        )


async def test_a_bad_subjects_file_is_refused_by_line_and_nothing_starts(
    hospital: Hospital,
) -> None:
    """Duplicates, a missing column, a missing identity the plan needs, an unknown tenant, more
    than a million lines: one clear error each (with the line where there is one), nothing
    staged, no request started, no id quoted."""
    client = await hospital.sdk()
    query = f"LetheKind = 'erasure-bulk' AND LetheTenant = '{hospital.tenant}'"
    started_before = [w.id async for w in client.temporal.list_workflows(query)]
    staged_before = await _bulk_rows(hospital)
    ada, grace = hospital.patients[0], hospital.patients[1]
    big = hospital.workdir / "big.csv"
    with big.open("w") as out:
        out.write("subject_id,email\n")
        out.writelines(f"x-{n},x{n}@example.org\n" for n in range(1_000_001))
    cases = {
        "dupes.csv": (
            f"subject_id,email\n{ada.patient_id},{ada.email}\n\n{ada.patient_id},{ada.email}\n",
            ["dupes.csv:4", "line 2"],
        ),
        "nocolumn.csv": (f"patient,email\n{ada.patient_id},{ada.email}\n", ["subject_id"]),
        "noemail.csv": (
            f"subject_id,email\n{ada.patient_id},{ada.email}\n{grace.patient_id},\n",
            ["noemail.csv:3", "email"],
        ),
    }
    for name, (content, _) in cases.items():
        (hospital.workdir / name).write_text(content)
    runs = [
        (name, ["--tenant", hospital.tenant, "--subjects-file", str(hospital.workdir / name)], e)
        for name, (_, e) in cases.items()
    ]
    runs.append(("unknown tenant", ["--tenant", "nobody", "--subjects-file", str(big)], ["nobody"]))
    runs.append(("big", ["--tenant", hospital.tenant, "--subjects-file", str(big)], ["1,000,000"]))
    for name, args, expected in runs:
        result = await hospital.lethe("erase", *args, "--by", "clerk", timeout=120)
        assert result.code != 0, f"{name}: {result}"
        assert "Traceback" not in result.stderr, f"{name}: {result}"
        for text in expected:
            assert text in result.stderr, f"{name}: {result}"
        assert ada.patient_id not in result.stderr and ada.email not in result.stderr
    assert await _bulk_rows(hospital) == staged_before
    assert [w.id async for w in client.temporal.list_workflows(query)] == started_before


@pytest.mark.timeout(300)
async def test_kafka_steps_pending_compaction_are_verified_again_when_the_window_ends(
    hospital: Hospital, worker: WorkerProcess
) -> None:
    """With a 30-second window, the bulk request's Kafka step is `pending_compaction` (removal
    bounded inside the window, not yet past); the hospital keeps writing, the log cleaner
    removes the shadowed profiles, and at the window's end the step is verified again: every
    subject `erased`, the re-check's own Merkle root in the ledger."""
    await worker.stop()  # this test's worker reads a pack with a window
    pack = (HERE / "policy.yaml").read_text()
    hospital.policy = hospital.workdir / "policy-window.yaml"
    hospital.policy.write_text(pack.replace("window_days: 0", "window: 30s"))
    windowed = hospital.worker()
    await windowed.start()
    targets = hospital.patients[TARGETS + KILLED :]
    started = await hospital.lethe(
        "erase", "--tenant", hospital.tenant,
        "--subjects-file", str(_subjects_file(hospital, targets, "window.csv")),
        "--by", "clerk", "--no-wait",
    )  # fmt: skip
    bulk_id = _bulk_id(started)
    approved = await hospital.lethe("bulk", "approve", bulk_id, "--by", "dpo")
    assert approved.code == 0, str(approved)
    waiting = await _wait_for(hospital, bulk_id, "waiting_window")
    kafka = next(s for s in waiting["steps"] if s["step_id"] == "patient-events/0")
    assert kafka["statuses"] == {"pending_compaction": len(targets)}, waiting
    assert waiting["counts"]["incomplete"] == len(targets)
    await asyncio.sleep(1.5)  # past segment.ms: the next record rolls each tombstone's segment
    partitions = {hospital.kafka_placed[p.patient_id][0] for p in targets}
    for partition in sorted(partitions):
        await asyncio.to_thread(
            register_on,
            hospital.connections.kafka_bootstrap,
            hospital.topic,
            partition,
            hospital.suffix,
        )

    done = await _wait_for(hospital, bulk_id, "completed", timeout=180)
    await windowed.stop()
    assert done["counts"]["erased"] == len(targets), json.dumps(done["counts"])
    kafka = next(s for s in done["steps"] if s["step_id"] == "patient-events/0")
    assert kafka["statuses"] == {"done": len(targets)}, json.dumps(done["steps"])
    client = await hospital.sdk()
    roots = await bulk_sdk.roots(client, bulk_id)
    assert [r.size for r in roots if r.phase == "recheck"] == [len(targets)]
