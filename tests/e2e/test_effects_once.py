"""A worker that dies right after a step's effect, before the activity completes: the retry on
another worker must not make the effect a second time, and the certificate must show the first.

The dying worker is worker.py run by tests/e2e/crash_after_effect.py, which wraps the
connector's method that makes the effect so the process ends (`os._exit(9)`) as soon as it
returns. Temporal retries the activity once its heartbeat timeout (20 seconds) has passed, on a
normal worker started meanwhile. Each kind of system is one `Effect`: the method to end after,
and how the system itself shows the effect happened once and matches the evidence.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.storage.blob.aio import BlobServiceClient
from redis.asyncio import Redis
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import create_async_engine

from lethe.contracts import Subject
from lethe.examples.seed import (
    EXPORTS_CONTAINER,
    LOG_PREFIX,
    LOGS_CONTAINER,
    SUBJECT_TAG,
    Patient,
    export_blob_name,
    sample_patients,
    seed_kafka,
    seed_redis,
    seed_sql,
    sql_prefix,
)
from lethe.kernel.config import Settings, load_settings
from lethe.kernel.errors import KeyShredded
from lethe.keys import store as key_store
from tests.e2e.conftest import (
    Hospital,
    approve,
    certificate_of,
    erase_and_wait_for_approval,
    kafka_records,
)
from tests.e2e.crash_after_effect import CRASH_AFTER, EXIT_CODE, MARKER
from tests.key_stores import EVENTS, KEYS_SYSTEM, fresh_key_store, key_rows, key_service

CRASH_SCRIPT = "tests/e2e/crash_after_effect.py"
CRASH_TIMEOUT = 120.0
"""From approval until the dying worker has made the effect and ended."""
COMPLETION_TIMEOUT = 240.0
"""From the normal worker's start until the erasure completes (the retry waits out the
activity's heartbeat timeout first)."""

Outcome = dict[str, Any]
"""One step's outcome as `lethe certificate --json` shows it."""


@dataclass(frozen=True)
class Effect:
    """One kind of system's effect: where the worker dies, and how to check it happened once."""

    kind: str
    """The data map's system kind (`sql`, `kafka`, `redis`, `blob`, `logs`, `keys`)."""
    crash_after: str
    """`module:Class.method` that makes the effect; the worker ends once it has returned."""
    once: Callable[[Hospital, Patient, Outcome], Awaitable[None]]
    """Asserts, with the system's own client, one effect for the patient that the step's
    outcome (its evidence) matches."""
    step: str | None = None
    """The plan's step whose outcome `once` gets, where the kind has several (SQL: one a
    table); None: the kind's one step."""
    holding: Callable[[Hospital, Patient], AbstractAsyncContextManager[None]] | None = None
    """What the test holds from before approval until the dying worker has ended (SQL: locks
    that let only `step` make its effect on the dying worker)."""


async def _one_tombstone(hospital: Hospital, patient: Patient, outcome: Outcome) -> None:
    key = f"patient:{patient.patient_id}".encode()
    records = await asyncio.to_thread(
        kafka_records, hospital.connections.kafka_bootstrap, hospital.topic
    )
    tombstones = [(p, o) for p, o, k, v in records if k == key and v is None]
    assert len(tombstones) == 1, tombstones
    evidence = outcome["evidence"]
    assert (evidence["partition"], evidence["offset"]) == tombstones[0], evidence
    assert evidence["tombstone_reused"] is True, evidence  # the retry found the first one


class _OnlyThePatientsRow:
    """SQL: while the dying worker runs, the patient's visits and lab results are locked (FOR
    UPDATE), so the only SQL effect it can make is the patients row's soft delete; the retry
    must then find it done, change nothing, and report the first attempt's row."""

    step = "patients-db/0"

    def __init__(self) -> None:
        self.committed: dict[str, str] = {}
        """Patient id -> the row version (xmin) of their patients row after the crash."""

    @contextlib.asynccontextmanager
    async def holding(self, hospital: Hospital, patient: Patient) -> AsyncIterator[None]:
        _, appointments, lab_results = hospital.tables()
        visits = [visit.id for visit in patient.appointments]
        engine = create_async_engine(hospital.connections.sql_url)
        try:
            async with engine.connect() as conn:
                for table, column in ((appointments, "id"), (lab_results, "appointment_id")):
                    locked = select(table.c.id).where(table.c[column].in_(visits))
                    assert (await conn.execute(locked.with_for_update())).all()
                yield
                await conn.rollback()
            async with engine.connect() as conn:
                row = (await conn.execute(self._version(hospital, patient))).one()
        finally:
            await engine.dispose()
        assert row.deleted_at is not None  # the dying worker's commit
        self.committed[patient.patient_id] = row.xmin

    @staticmethod
    def _version(hospital: Hospital, patient: Patient) -> Any:
        patients = hospital.tables()[0]
        return select(text("xmin::text AS xmin"), patients.c.deleted_at, patients.c.email).where(
            patients.c.patient_id == patient.patient_id
        )

    async def once(self, hospital: Hospital, patient: Patient, outcome: Outcome) -> None:
        evidence = outcome["evidence"]
        assert (outcome["status"], outcome["affected"]) == ("done", 1), outcome
        # The retry found the row erased: it reports the first attempt's count, changes nothing.
        assert (evidence["rows_from_attempt"], evidence["counted_by_attempt"]) == (1, 1), evidence
        assert (evidence["rows"], evidence["rows_changed"]) == (1, 0), evidence
        assert evidence["attempt"] >= 2 and evidence["rows_same_as_attempt"] is True, evidence
        engine = create_async_engine(hospital.connections.sql_url)
        try:
            async with engine.connect() as conn:
                row = (await conn.execute(self._version(hospital, patient))).one()
        finally:
            await engine.dispose()
        # Changed once: the row version is still the one the dying worker committed.
        assert row.xmin == self.committed[patient.patient_id]
        assert row.email == "erased@erased.invalid"


# --- Redis, blob backups, logs and the key store ------------------------------------------------

KEYS_VARIABLE = "LETHE_E2E_EFFECTS_KEYS_STORE_URL"
_events: dict[str, dict[str, str]] = {}
"""Patient id -> the personal fields of an event of theirs, sealed under their data key."""


@pytest.fixture(scope="module", autouse=True)
async def _every_kind(hospital: Hospital, settings: Settings) -> AsyncIterator[None]:
    """A patient of its own for each case, and a key store (the system `patient-keys`) under
    whose keys the hospital's services seal each patient's events, so that every kind of
    system is in each erasure's plan."""
    await _more_patients(hospital, len(EFFECTS))
    async with fresh_key_store("effects") as url:
        with pytest.MonkeyPatch.context() as env:
            env.setenv(KEYS_VARIABLE, url)  # the CLI's and the workers' environment
            with hospital.datamap.open("a") as datamap:
                datamap.write(KEYS_SYSTEM.format(region=hospital.region, variable=KEYS_VARIABLE))
            keys = await key_service(url, settings.keys_master_key_bytes, hospital.subject_key)
            for patient in hospital.patients:
                subject = Subject(tenant=hospital.tenant, subject_id=patient.patient_id)
                _events[patient.patient_id] = await keys.encrypt_fields(
                    subject, {"email": patient.email}, *EVENTS
                )
            yield


async def _more_patients(hospital: Hospital, wanted: int) -> None:
    """Seed patients until the hospital has `wanted`: rows, a profile record, cache keys and an
    export each (no log lines: the day blobs hold the first patients')."""
    have = len(hospital.patients)
    if have >= wanted:
        return
    extra = [
        dataclasses.replace(
            patient,
            patient_id=f"pt-{hospital.suffix}-{n}",
            email=f"patient{n}.{hospital.suffix}@st-mary.example",
        )
        for n, patient in enumerate(
            sample_patients(wanted - have, seed=None, first_appointment=1000), have + 1
        )
    ]
    systems = hospital.connections
    await seed_sql(systems.sql_url, extra, sql_prefix(hospital.prefix))
    hospital.kafka_placed.update(
        await asyncio.to_thread(seed_kafka, systems.kafka_bootstrap, extra, hospital.prefix)
    )
    await seed_redis(systems.redis_url, extra, hospital.prefix)
    async with BlobServiceClient.from_connection_string(systems.blob_connection) as service:
        exports = service.get_container_client(hospital.container(EXPORTS_CONTAINER))
        for patient in extra:
            ref = hospital.ref(patient)
            export = json.dumps({**patient.profile(), "mrn": patient.mrn}).encode()
            await exports.upload_blob(export_blob_name(ref), export, tags={SUBJECT_TAG: ref})
    hospital.patients.extend(extra)


async def _cache_purged_once(hospital: Hospital, patient: Patient, outcome: Outcome) -> None:
    """Redis: the patient's keys and hash field are gone, the next patient's are not; the retry
    removed nothing, and the evidence is the dying worker's plan (its counts never arrived)."""
    client: Redis = Redis.from_url(hospital.connections.redis_url, decode_responses=True)
    try:
        keys = [
            f"{hospital.prefix}patient:{patient.patient_id}:profile",
            f"{hospital.prefix}patient:{patient.patient_id}:visits",
            f"{hospital.prefix}session:{patient.patient_id}",
        ]
        assert [key for key in keys if await client.exists(key)] == []
        assert not await client.hexists(f"{hospital.prefix}patients:by-email", patient.email)
        later = hospital.patients[-1]
        assert later != patient
        assert await client.exists(f"{hospital.prefix}session:{later.patient_id}")
    finally:
        await client.aclose()
    evidence = outcome["evidence"]
    assert outcome["status"] == "done", outcome
    assert (evidence["keys_remaining"], evidence["hash_fields_remaining"]) == (0, 0), evidence
    assert (evidence["retry_keys_unlinked"], evidence["retry_hash_fields_removed"]) == (0, 0)
    # The dying worker's plan reached the server before it unlinked: 3 keys and 1 hash field.
    assert evidence["first_attempt_evidence"] == "planned", evidence
    assert (evidence["earlier_found_keys"], evidence["earlier_found_hash_fields"]) == (3, 1)
    assert outcome["affected"] == 4, outcome
    # What its UNLINK returned did not: not known, so not made up.
    assert evidence["keys_unlinked"] is None and evidence["hash_fields_removed"] is None


async def _export_deleted_once(hospital: Hospital, patient: Patient, outcome: Outcome) -> None:
    """Blob backups: the patient's export is gone, the next patient's is not; the retry deleted
    nothing, and the evidence is the dying worker's plan (its count never arrived)."""
    ref = hospital.ref(patient)
    async with BlobServiceClient.from_connection_string(
        hospital.connections.blob_connection
    ) as service:
        exports = service.get_container_client(hospital.container(EXPORTS_CONTAINER))
        assert not await exports.get_blob_client(export_blob_name(ref)).exists()
        query = f"\"{SUBJECT_TAG}\" = '{ref}'"
        assert [blob.name async for blob in exports.find_blobs_by_tags(query)] == []
        later = hospital.ref(hospital.patients[-1])
        assert await exports.get_blob_client(export_blob_name(later)).exists()
    evidence = outcome["evidence"]
    assert outcome["status"] == "done", outcome
    assert evidence["subject_blobs_remaining"] == 0, evidence
    assert evidence["retry_subject_blobs_deleted"] == 0, evidence
    assert evidence["first_attempt_evidence"] == "planned", evidence
    assert evidence["earlier_found_subject_blobs"] == 1, evidence
    assert outcome["affected"] == 1, outcome
    assert evidence["subject_blobs_deleted"] is None, evidence


class _LogsRewrittenOnce:
    """Logs: the dying worker rewrites the first day's blob and ends before any heartbeat; the
    retry knows that blob by its marks, rewrites only the second, and counts both."""

    def __init__(self) -> None:
        self.before: dict[str, list[bytes]] = {}
        """Log blob -> its lines before the erasure."""
        self.ended_at = datetime.min.replace(tzinfo=UTC)
        """When the dying worker had ended."""

    @contextlib.asynccontextmanager
    async def holding(self, hospital: Hospital, patient: Patient) -> AsyncIterator[None]:
        self.before = {name: content.split(b"\n") for name, content in (await _logs(hospital))}
        assert len(self.before) == 2
        yield
        self.ended_at = datetime.now(UTC)

    async def once(self, hospital: Hospital, patient: Patient, outcome: Outcome) -> None:
        theirs = (f'"{patient.patient_id}"'.encode(), f'"{patient.email}"'.encode())
        rewritten = []
        async with BlobServiceClient.from_connection_string(
            hospital.connections.blob_connection
        ) as service:
            logs = service.get_container_client(hospital.container(LOGS_CONTAINER))
            for name, before in self.before.items():
                after = (await (await logs.download_blob(name)).readall()).split(b"\n")
                assert len(after) == len(before)
                mine = [i for i, line in enumerate(before) if any(v in line for v in theirs)]
                assert len(mine) == 2, name  # a login and a results view a day
                for i, (was, now) in enumerate(zip(before, after, strict=True)):
                    if i in mine:
                        assert json.loads(now)["patient_id"] == "[redacted]"
                    else:
                        assert now == was  # everyone else's lines, byte for byte
                rewritten.append(await logs.get_blob_client(name).get_blob_properties())
        first, second = sorted(rewritten, key=lambda blob: blob.name)
        assert {blob.metadata["lethe_records"] for blob in rewritten} == {"2"}
        assert {blob.metadata["lethe_step"] for blob in rewritten} == {"app-logs/0"}
        # The first blob was rewritten once, by the dying worker; the second by the retry.
        assert first.last_modified <= self.ended_at < second.last_modified + timedelta(seconds=1)
        evidence = outcome["evidence"]
        assert outcome["status"] == "done", outcome
        assert (outcome["affected"], evidence["records_redacted"]) == (4, 4), evidence
        assert evidence["blobs_rewritten"] == 2, evidence
        assert evidence["first_attempt_evidence"] == "blob metadata", evidence
        assert evidence["earlier_blobs_rewritten"] == 1, evidence
        assert evidence["earlier_records_redacted"] == 2, evidence
        assert evidence["retry_records_redacted"] == 2, evidence
        assert evidence["records_matching"] == 0, evidence


async def _logs(hospital: Hospital) -> list[tuple[str, bytes]]:
    """The log blobs under the data map's prefix, and their contents."""
    async with BlobServiceClient.from_connection_string(
        hospital.connections.blob_connection
    ) as service:
        logs = service.get_container_client(hospital.container(LOGS_CONTAINER))
        return [
            (blob.name, await (await logs.download_blob(blob.name)).readall())
            async for blob in logs.list_blobs(name_starts_with=LOG_PREFIX)
        ]


async def _keys_shredded_once(hospital: Hospital, patient: Patient, outcome: Outcome) -> None:
    """Key store: one shredding of the patient's one key version, recorded for this request;
    the retry destroyed nothing, reports the first shredding from the key store's record, and
    kept the dying worker's canary (its plan reached the server before the keys went)."""
    settings = load_settings()
    keys = await key_service(
        os.environ[KEYS_VARIABLE], settings.keys_master_key_bytes, hospital.subject_key
    )
    ref = hospital.ref(patient)
    assert await key_rows(keys, ref) == []
    table = key_store.shredded
    async with keys.engine.connect() as conn:
        records = (await conn.execute(select(table).where(table.c.subject_ref == ref))).all()
    evidence = outcome["evidence"]
    assert [(r.request_id, r.versions_destroyed) for r in records] == [
        (evidence["shredding_request"], 1)
    ]
    with pytest.raises(KeyShredded):
        await keys.decrypt_fields(_events[patient.patient_id], *EVENTS, cached=False)
    assert outcome["status"] == "done", outcome
    assert (outcome["affected"], evidence["versions_destroyed"]) == (1, 1), evidence
    assert evidence["first_attempt_evidence"] == "key store", evidence
    assert evidence["retry_versions_destroyed"] == 0, evidence
    assert evidence["canary_decryption"] == "KeyShredded", evidence
    assert "canary kept from an earlier attempt" in outcome["detail"]


_LOGS = _LogsRewrittenOnce()


_SQL = _OnlyThePatientsRow()
EFFECTS = [
    Effect("kafka", "lethe.activities.kafka:TombstoneWriter._produce_tombstone", _one_tombstone),
    Effect("sql", "lethe.activities.sql:SqlEraser._commit", _SQL.once, _SQL.step, _SQL.holding),
    Effect(
        "logs", "lethe.activities.logs:LogRedactor._erase_blob", _LOGS.once, holding=_LOGS.holding
    ),
    Effect(
        "blob",
        "lethe.activities.blob:BackupEraser._delete_subject_blobs",
        _export_deleted_once,
        "backups/0",
    ),
    Effect("redis", "lethe.activities.cache:CacheEraser._remove", _cache_purged_once),
    Effect("keys", "lethe.keys.service:KeyService.shred", _keys_shredded_once),
]


def _outcome(certificate: dict[str, Any], kind: str, step: str | None = None) -> Outcome:
    """The certificate's outcome of the plan's one step of `kind` (or its step `step`)."""
    step_ids = [
        planned["id"]
        for region in certificate["plan"]["regions"]
        for planned in region["steps"]
        if planned["kind"] == kind and step in (None, planned["id"])
    ]
    assert len(step_ids) == 1, step_ids
    outcomes = [s for s in certificate["steps"] if s["step_id"] == step_ids[0]]
    assert len(outcomes) == 1, certificate["steps"]
    found: Outcome = outcomes[0]
    return found


@pytest.mark.parametrize("effect", EFFECTS, ids=[effect.kind for effect in EFFECTS])
async def test_an_effect_is_made_once_when_the_worker_dies_right_after_it(
    hospital: Hospital, effect: Effect
) -> None:
    """Erase a patient on a worker that dies right after the effect; a new one completes it."""
    patient = hospital.patients[EFFECTS.index(effect)]  # a patient of its own per kind
    dying = hospital.worker()
    dying.script = CRASH_SCRIPT
    dying.env = {**dying.env, CRASH_AFTER: effect.crash_after}
    normal = hospital.worker()
    try:
        await dying.start()
        workflow_id = await erase_and_wait_for_approval(hospital, patient)
        holding = effect.holding or (lambda *_: contextlib.nullcontext())
        async with holding(hospital, patient):
            await approve(hospital, workflow_id)
            assert dying.process is not None
            code = await asyncio.wait_for(dying.process.wait(), CRASH_TIMEOUT)
        assert code == EXIT_CODE, dying.log_text()[-3000:]
        assert MARKER in dying.log_text()

        await normal.start()
        await asyncio.wait_for((await hospital.sdk()).result(workflow_id), COMPLETION_TIMEOUT)
        certificate = await certificate_of(hospital, workflow_id)

        await effect.once(hospital, patient, _outcome(certificate, effect.kind, effect.step))
        step_ids = [s["step_id"] for s in certificate["steps"]]
        assert len(step_ids) == len(set(step_ids)), step_ids  # each step once
    finally:
        # The next kind's dying worker must be the only one serving the region.
        await normal.stop()
        await dying.stop()
