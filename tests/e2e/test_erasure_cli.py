"""A DPO erases a patient through the `lethe` CLI, and every system's own client checks the result.

The sample hospital is seeded in PostgreSQL, Kafka, Redis and Azurite (exports, whole backups,
portal logs); a worker process serves the run's region and control queue; every `lethe`
command runs as a subprocess, as a DPO would type it. The policy pack (tests/e2e/policy.yaml)
is GDPR's with approval always required and a zero-day window, so the deferred phase (backups
and logs) runs at once on the real Temporal server.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from typing import Any

from azure.storage.blob.aio import BlobServiceClient
from confluent_kafka import Consumer, TopicPartition
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from lethe.examples.seed import (
    BACKUP_PREFIX,
    BACKUPS_CONTAINER,
    EXPORTS_CONTAINER,
    LOG_PREFIX,
    LOGS_CONTAINER,
    Patient,
    export_blob_name,
)
from tests.e2e.conftest import (
    CliResult,
    Footprint,
    Hospital,
    WorkerProcess,
    approve_and_complete,
    certificate_of,
    erase_and_wait_for_approval,
    footprint,
    status_of,
)

REDACTED = "[redacted]"
STEPS = {
    "patients-db/0": ("sql", "soft_delete"),
    "patients-db/1": ("sql", "pseudonymize"),
    "patients-db/2": ("sql", "pseudonymize"),
    "patient-events/0": ("kafka", "tombstone"),
    "session-cache/0": ("redis", "purge"),
    "backups/0": ("blob", "delete"),
    "backups/1": ("blob", "delete"),
    "app-logs/0": ("logs", "redact"),
}
"""What the test policy decides for the hospital's data map, step by step."""


def _one_clear_line(result: CliResult, *expected: str) -> None:
    """A refused command: non-zero, one `error:` line naming the problem, no traceback."""
    assert result.code != 0, str(result)
    # (`erase` may have drawn its live status table just before the line.)
    lines = re.findall(r"error: .*", result.stderr)
    assert len(lines) == 1, str(result)
    for text in expected:
        assert text in lines[0], str(result)
    assert "Traceback" not in result.stderr + result.stdout, str(result)
    assert "╭" not in result.stderr, str(result)  # rich's traceback panel


def _read_at(bootstrap: str, topic: str, partition: int, offset: int) -> tuple[Any, Any]:
    """The key and value of one record (blocking)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "e2e-read"})
    try:
        consumer.assign([TopicPartition(topic, partition, offset)])
        message = consumer.poll(10)
        assert message is not None and message.error() is None
        assert message.offset() == offset
        return message.key(), message.value()
    finally:
        consumer.close()


async def test_a_dpo_erases_a_patient_everywhere_through_the_cli(
    hospital: Hospital, worker: WorkerProcess
) -> None:
    """Dry run, request, approval, status, certificate; then each system shows the result.

    Kafka's honest answer decides the outcome. The topic is compacted with segment.ms and
    max.compaction.lag.ms of one second, so Kafka bounds removal of the patient's earlier
    records to a few seconds (plus the cleaner's backoff) after the tombstone. The policy's
    window is zero days, though, so the erasure window ends the moment the erasure starts: no
    Kafka setting can remove records before a tombstone that is written later, and the Kafka
    step is `at_risk` ("gone only by ..., after the erasure window ends"). Every other step is
    `done`, so the certificate's outcome is `incomplete`: Lethe does not claim what it cannot
    prove. (`erased_pending_compaction` needs a window longer than the compaction bound, i.e.
    at least a day of real time on this server.)
    """
    ada, grace = hospital.patients[0], hospital.patients[1]
    before = await footprint(hospital)

    # The dry run prints the plan and touches nothing.
    dry = await hospital.lethe(
        "erase",
        "--tenant",
        hospital.tenant,
        "--subject",
        ada.patient_id,
        "--identity",
        f"email={ada.email}",
        "--dry-run",
        "--json",
    )
    assert dry.code == 0, str(dry)
    plan = dry.json()
    assert plan["subject_ref"] == hospital.ref(ada)
    assert plan["approval_required"] is True
    assert plan["window_days"] == 0
    assert {s["id"]: (s["kind"], s["action"]) for r in plan["regions"] for s in r["steps"]} == STEPS
    assert "approval will be required" in dry.stderr

    # The request waits for the DPO, and nothing is touched while it waits. (Reading the
    # systems while the request is made is safe: nothing may change before approval.)
    after_dry, workflow_id = await asyncio.gather(
        footprint(hospital), erase_and_wait_for_approval(hospital, ada)
    )
    assert after_dry == before
    waiting, while_waiting = await asyncio.gather(
        status_of(hospital, workflow_id), footprint(hospital)
    )
    assert waiting["state"] == "awaiting_approval"
    assert waiting["approval_required"] is True
    assert while_waiting == before

    final = await approve_and_complete(hospital, workflow_id)
    assert final["approval"]["by"] == "dpo"
    assert {s["step_id"] for s in final["steps"]} == set(STEPS)

    await hospital.wait_listed(workflow_id, "completed")  # visibility trails the workflow
    certificate, after, verified, listed, history = await asyncio.gather(
        certificate_of(hospital, workflow_id),
        footprint(hospital),
        hospital.lethe("audit", "verify"),
        hospital.lethe("audit", "list", "--json"),
        hospital.lethe("audit", "history", workflow_id, "--json"),
    )
    assert certificate["subject_ref"] == hospital.ref(ada)
    assert certificate["tenant"] == hospital.tenant
    assert certificate["policy"] == "e2e-gdpr@test"
    assert certificate["approval"]["by"] == "dpo"
    outcomes = {s["step_id"]: s for s in certificate["steps"]}
    assert [s["step_id"] for s in certificate["steps"]] == list(STEPS)  # each step once
    not_done = {k: v["status"] for k, v in outcomes.items() if v["status"] != "done"}
    assert not_done == {"patient-events/0": "at_risk"}, json.dumps(outcomes, indent=1)
    assert "after the erasure window ends" in outcomes["patient-events/0"]["detail"]
    assert certificate["outcome"] == "incomplete"
    assert all(outcome["verified"] for outcome in certificate["steps"])
    assert outcomes["patients-db/0"]["affected"] == 1
    assert outcomes["patients-db/1"]["affected"] == len(ada.appointments)
    assert outcomes["patients-db/2"]["affected"] == len(ada.appointments)
    assert outcomes["backups/0"]["evidence"]["subject_blobs_remaining"] == 0
    assert outcomes["backups/1"]["evidence"]["whole_backups_past_window"] == 0
    assert outcomes["app-logs/0"]["evidence"]["records_matching"] == 0
    assert len(certificate["ledger_hashes"]) == len(set(certificate["ledger_hashes"]))

    await check_sql(hospital, ada, grace, before, after)
    await check_redis(hospital, ada, grace, before, after)
    _check_kafka(hospital, ada, grace, before, after, outcomes["patient-events/0"])
    check_blobs(hospital, ada, grace, before, after)

    assert verified.code == 0, str(verified)
    assert "ledger intact" in verified.stdout
    assert listed.code == 0, str(listed)
    requests = {row["request"]: row for row in listed.json()}
    assert requests[workflow_id]["status"] == "completed"
    assert requests[workflow_id]["regions"] == [hospital.region]
    assert history.code == 0, str(history)
    events = history.json()
    started = events[0]
    assert started["type"] == "workflow_execution_started"
    assert started["payloads"][0]["request_id"] == certificate["request_id"]
    assert started["payloads"][0]["request"]["requested_by"] == "clerk"
    assert events[-1]["type"] == "workflow_execution_completed"
    assert events[-1]["payloads"][0]["outcome"] == "incomplete"
    # The control plane's work runs as local activities: recorded as markers, results decrypted.
    local = {e["detail"] for e in events if e["type"] == "marker_recorded"}
    assert {"planning.plan", "ledger.record", "holds.blocking", "certificate.issue"} <= local
    # The region's work is scheduled on its queue by the request itself: one preflight
    # activity for the region, one activity per step; no child workflow.
    scheduled = {e["detail"] for e in events if e["type"] == "activity_task_scheduled"}
    assert {"region.preflight", "sql.erase", "kafka.erase", "redis.erase"} <= scheduled
    assert not [e for e in events if e["type"] == "start_child_workflow_execution_initiated"]


async def check_sql(
    hospital: Hospital, ada: Patient, grace: Patient, before: Footprint, after: Footprint
) -> None:
    """Ada's patient row is soft-deleted and cleared; her visits and results pseudonymised
    (cleared, still linked to her row)."""
    patients, appointments, lab_results = hospital.tables()
    engine = create_async_engine(hospital.connections.sql_url)
    try:
        async with engine.connect() as conn:
            row = (
                await conn.execute(select(patients).where(patients.c.patient_id == ada.patient_id))
            ).one()
            visits = (
                await conn.execute(
                    select(appointments.c.notes).where(appointments.c.patient_id == ada.patient_id)
                )
            ).all()
            results = (
                await conn.execute(
                    select(lab_results.c.result).where(
                        lab_results.c.appointment_id.in_(
                            select(appointments.c.id).where(
                                appointments.c.patient_id == ada.patient_id
                            )
                        )
                    )
                )
            ).all()
    finally:
        await engine.dispose()
    assert row.deleted_at is not None
    assert (row.full_name, row.email) == ("erased", "erased@erased.invalid")  # NOT NULL columns
    assert (row.phone, row.date_of_birth, row.mrn) == (None, None, None)
    assert len(visits) == len(ada.appointments) and all(v.notes is None for v in visits)
    assert len(results) == len(ada.appointments) and all(r.result is None for r in results)
    # Everyone else's rows are exactly as seeded.
    visit_ids = {a.id for a in ada.appointments}
    hers: dict[str, Callable[[tuple[Any, ...]], bool]] = {
        patients.name: lambda r: r[0] == ada.patient_id,
        appointments.name: lambda r: r[1] == ada.patient_id,
        lab_results.name: lambda r: r[1] in visit_ids,
    }
    for table, is_hers in hers.items():
        assert [r for r in before.sql[table] if not is_hers(r)] == [
            r for r in after.sql[table] if not is_hers(r)
        ], table
        assert len(before.sql[table]) == len(after.sql[table])  # nothing deleted
    grace_row = next(r for r in after.sql[patients.name] if r[0] == grace.patient_id)
    assert grace_row[1:3] == (grace.full_name, grace.email)


async def check_redis(
    hospital: Hospital, ada: Patient, grace: Patient, before: Footprint, after: Footprint
) -> None:
    """Ada's keys and her email's index entry are gone; nothing else changed."""
    prefix = hospital.prefix
    ada_keys = {
        f"{prefix}patient:{ada.patient_id}:profile",
        f"{prefix}patient:{ada.patient_id}:visits",
        f"{prefix}session:{ada.patient_id}",
    }
    assert ada_keys <= set(before.redis)
    assert not ada_keys & set(after.redis)
    index = f"{prefix}patients:by-email"
    assert ada.email in before.redis[index]
    assert ada.email not in after.redis[index]
    assert after.redis[index] == {k: v for k, v in before.redis[index].items() if k != ada.email}
    assert {k: v for k, v in before.redis.items() if k not in ada_keys and k != index} == {
        k: v for k, v in after.redis.items() if k != index
    }
    client: Redis = Redis.from_url(hospital.connections.redis_url, decode_responses=True)
    try:
        assert await client.exists(*ada_keys) == 0
        assert await client.hget(index, grace.email) == grace.patient_id
        assert await client.hget(index, ada.email) is None
    finally:
        await client.aclose()


def _check_kafka(
    hospital: Hospital,
    ada: Patient,
    grace: Patient,
    before: Footprint,
    after: Footprint,
    outcome: dict[str, Any],
) -> None:
    """A tombstone for Ada's key sits where the certificate says; nothing else was written."""
    evidence = outcome["evidence"]
    partition, offset = evidence["partition"], evidence["offset"]
    assert evidence["topic"] == hospital.topic
    assert evidence["cleanup_policy"] == "compact"
    assert evidence["max_compaction_lag_ms"] == 1000
    key, value = _read_at(hospital.connections.kafka_bootstrap, hospital.topic, partition, offset)
    assert (key, value) == (f"patient:{ada.patient_id}".encode(), None)
    seeded_partition, seeded_offset = hospital.kafka_placed[ada.patient_id]
    assert seeded_partition == partition and seeded_offset < offset  # it shadows her profile
    new = [r for r in after.kafka if r not in before.kafka]
    assert new == [(partition, offset, key, None)]
    grace_records = [r for r in after.kafka if r[2] == f"patient:{grace.patient_id}".encode()]
    assert [json.loads(r[3] or b"null")["email"] for r in grace_records] == [grace.email]


def check_blobs(
    hospital: Hospital, ada: Patient, grace: Patient, before: Footprint, after: Footprint
) -> None:
    """Ada's export is gone, the pre-erasure whole backup is gone, her log records redacted."""
    ada_export = f"{EXPORTS_CONTAINER}/{export_blob_name(hospital.ref(ada))}"
    grace_export = f"{EXPORTS_CONTAINER}/{export_blob_name(hospital.ref(grace))}"
    assert ada_export in before.blobs and ada_export not in after.blobs
    assert after.blobs[grace_export] == before.blobs[grace_export]
    assert after.tags[grace_export] == {"subject_ref": hospital.ref(grace)}
    # A whole backup holds everyone; taken before the erasure and past the window, it must go.
    backups = [k for k in before.blobs if k.startswith(f"{BACKUPS_CONTAINER}/{BACKUP_PREFIX}")]
    assert backups and not [k for k in after.blobs if k.startswith(BACKUPS_CONTAINER)]

    logs = sorted(k for k in before.blobs if k.startswith(f"{LOGS_CONTAINER}/{LOG_PREFIX}"))
    assert logs == sorted(k for k in after.blobs if k.startswith(LOGS_CONTAINER))
    for name in logs:
        old = before.blobs[name].decode().splitlines()
        new = after.blobs[name].decode().splitlines()
        assert len(old) == len(new)  # redacted in place, nothing dropped
        for was, now in zip(old, new, strict=True):
            record = json.loads(was)
            if record.get("patient_id") == ada.patient_id:
                redacted = json.loads(now)
                assert redacted["patient_id"] == REDACTED
                assert redacted.get("email", REDACTED) == REDACTED
                assert redacted["event"] == record["event"]
            else:
                assert now == was
        assert ada.patient_id not in after.blobs[name].decode()
        assert ada.email not in after.blobs[name].decode()
        assert grace.email in after.blobs[name].decode()


async def test_bad_input_is_refused_in_one_line_and_destroys_nothing(
    hospital: Hospital, worker: WorkerProcess
) -> None:
    """Unknown tenant and region, an unknown request id: refused with one clear line each.

    A subject id shaped like SQL injection is a valid (if odd) id: Lethe accepts the request,
    binds the id as a parameter and escapes it in Redis patterns, so after approval it finds
    and destroys nothing. Whole-database backups are left out of the comparison: any erasure
    deletes those taken before it once they are past the window (they hold everyone).
    """
    unknown_tenant = f"nobody-{hospital.suffix}"
    missing_id = "erasure-" + "0" * 32
    hostile = Patient(
        patient_id="1' OR '1'='1",
        full_name="-",
        email="*' OR '1'='1",
        phone="-",
        date_of_birth=hospital.patients[0].date_of_birth,
        mrn="-",
    )
    before = await footprint(hospital)

    tenant, tenant_dry, region, approve, hostile_id = await asyncio.gather(
        hospital.lethe("erase", "--tenant", unknown_tenant, "--subject", "p-1"),
        hospital.lethe("erase", "--tenant", unknown_tenant, "--subject", "p-1", "--dry-run"),
        hospital.lethe(
            "erase", "--tenant", hospital.tenant, "--subject", "p-1", "--region", "mars"
        ),
        hospital.lethe("approve", missing_id, "--by", "dpo"),
        erase_and_wait_for_approval(hospital, hostile),
    )
    _one_clear_line(tenant, "UnknownTenant", f"tenant {unknown_tenant!r} is not in the data map")
    _one_clear_line(tenant_dry, "cannot be planned", "UnknownTenant")
    _one_clear_line(region, "UnknownRegion", "'mars' is not one of the data map's regions")
    _one_clear_line(approve, f"no erasure request {missing_id}")

    await approve_and_complete(hospital, hostile_id)
    certificate = await certificate_of(hospital, hostile_id)
    touched = {s["step_id"]: s["affected"] for s in certificate["steps"]}
    assert touched == {**dict.fromkeys(STEPS, 0), "patient-events/0": 1}, touched  # a tombstone

    after = await footprint(hospital)
    assert after.sql == before.sql
    assert after.redis == before.redis
    assert [r for r in after.kafka if r not in before.kafka] == [
        (r[0], r[1], b"patient:1' OR '1'='1", None) for r in after.kafka if r not in before.kafka
    ]
    # Records of keys with a tombstone may meanwhile have been compacted away; all others stay.
    tombstoned = {r[2] for r in before.kafka if r[3] is None}
    assert {r for r in before.kafka if r[2] not in tombstoned} <= set(after.kafka)

    def kept(blobs: dict[str, bytes]) -> dict[str, bytes]:
        return {k: v for k, v in blobs.items() if not k.startswith(BACKUPS_CONTAINER)}

    assert kept(after.blobs) == kept(before.blobs)


async def test_the_export_blobs_are_tagged_by_reference_only(hospital: Hospital) -> None:
    """The seed tags each export with the subject reference, which Azurite can search by."""
    patient = hospital.patients[2]
    async with BlobServiceClient.from_connection_string(
        hospital.connections.blob_connection
    ) as service:
        container = service.get_container_client(hospital.container(EXPORTS_CONTAINER))
        query = f"\"subject_ref\" = '{hospital.ref(patient)}'"
        found = [blob.name async for blob in container.find_blobs_by_tags(query)]
    assert found == [export_blob_name(hospital.ref(patient))]
    assert patient.patient_id not in found[0]
