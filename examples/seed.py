"""Seed data for St Mary's, the sample hospital of `examples/datamap.yaml`, in real systems.

Each function fills one kind of system with the same patients: SQL tables `patients`,
`appointments` and `lab_results`; a compacted Kafka topic keyed `patient:{id}`; Redis keys
`patient:{id}:*`, `session:{id}` and the hash `patients:by-email`; per-subject export blobs
tagged with the subject reference, whole-database backups under `patients-db/`, and JSON-lines
portal logs. Every name takes a `prefix`, so tests can seed side by side without colliding; with
the empty prefix the names are exactly those of `examples/datamap.yaml`.

    python -m lethe.examples.seed --patients 20      # seeds the systems LETHE_STACK_* point at
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from azure.core.exceptions import ResourceExistsError
from azure.storage.blob.aio import BlobServiceClient
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from faker import Faker
from redis.asyncio import Redis
from sqlalchemy import (
    Column,
    Date,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    insert,
)
from sqlalchemy.ext.asyncio import create_async_engine

from lethe.kernel.subjects import tag_for

TENANT = "st-mary"
TOPIC = "patient-profile"
EXPORTS_CONTAINER = "patient-exports"
BACKUPS_CONTAINER = "db-backups"
LOGS_CONTAINER = "app-logs"
SUBJECT_TAG = "subject_ref"
BACKUP_PREFIX = "patients-db/"
LOG_PREFIX = "portal/"
FAST_COMPACTION = {
    "cleanup.policy": "compact",
    "segment.ms": "1000",
    "max.compaction.lag.ms": "1000",
    "min.cleanable.dirty.ratio": "0.01",
}
"""Topic settings under which Kafka bounds removal of a tombstoned key's records to seconds."""


@dataclass(frozen=True)
class Appointment:
    """One visit, with the lab results taken at it."""

    id: int
    at: datetime
    notes: str
    lab_results: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Patient:
    """One patient of the sample hospital (made-up data)."""

    patient_id: str
    full_name: str
    email: str
    phone: str
    date_of_birth: date
    mrn: str
    appointments: list[Appointment] = field(default_factory=list)

    def profile(self) -> dict[str, str]:
        """The profile as the portal publishes and caches it."""
        return {
            "patient_id": self.patient_id,
            "full_name": self.full_name,
            "email": self.email,
            "phone": self.phone,
        }


def sample_patients(
    count: int, *, seed: int | None = 7, id_prefix: str = "p-", first_appointment: int = 1
) -> list[Patient]:
    """`count` made-up patients with ids `<id_prefix>1...`, two visits and a lab result each.

    Appointment ids start at `first_appointment`, so two batches can share the tables.
    """
    fake = Faker()
    if seed is not None:
        fake.seed_instance(seed)
    patients: list[Patient] = []
    next_appointment = first_appointment
    for number in range(1, count + 1):
        visits = []
        for _ in range(2):
            visits.append(
                Appointment(
                    id=next_appointment,
                    at=fake.date_time_between("-2y", "now", tzinfo=UTC),
                    notes=fake.sentence(nb_words=8),
                    lab_results=[f"{fake.word()}: {fake.pyfloat(2, 1, positive=True)} mmol/L"],
                )
            )
            next_appointment += 1
        name = fake.name()
        patients.append(
            Patient(
                patient_id=f"{id_prefix}{number}",
                full_name=name,
                email=fake.unique.email(),
                phone=fake.phone_number(),
                date_of_birth=fake.date_of_birth(minimum_age=1, maximum_age=95),
                mrn=fake.bothify("MRN-########"),
                appointments=visits,
            )
        )
    return patients


def _patients(patients: int | Sequence[Patient]) -> Sequence[Patient]:
    return sample_patients(patients) if isinstance(patients, int) else patients


# --- SQL ---------------------------------------------------------------------------------------


def hospital_tables(prefix: str = "") -> tuple[MetaData, Table, Table, Table]:
    """The tables `<prefix>patients`, `<prefix>appointments` and `<prefix>lab_results`."""
    metadata = MetaData()
    patients = Table(
        f"{prefix}patients",
        metadata,
        Column("patient_id", String(64), primary_key=True),
        Column("full_name", String(200), nullable=False),
        Column("email", String(320), nullable=False),
        Column("phone", String(40)),
        Column("date_of_birth", Date),
        Column("mrn", String(32)),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("deleted_at", DateTime(timezone=True)),
    )
    appointments = Table(
        f"{prefix}appointments",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("patient_id", String(64), ForeignKey(patients.c.patient_id), nullable=False),
        Column("scheduled_at", DateTime(timezone=True), nullable=False),
        Column("notes", Text),
    )
    lab_results = Table(
        f"{prefix}lab_results",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("appointment_id", Integer, ForeignKey(appointments.c.id), nullable=False),
        Column("result", Text),
    )
    return metadata, patients, appointments, lab_results


async def seed_sql(url: str, patients: int | Sequence[Patient], prefix: str = "") -> None:
    """Create the hospital's tables (if missing) at an async SQLAlchemy URL and add the patients.

    Works with `postgresql+psycopg://` and `sqlite+aiosqlite://` URLs.
    """
    rows = _patients(patients)
    metadata, patient_table, appointment_table, lab_table = hospital_tables(prefix)
    now = datetime.now(UTC)
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
            if not rows:
                return
            await conn.execute(
                insert(patient_table),
                [
                    {
                        "patient_id": p.patient_id,
                        "full_name": p.full_name,
                        "email": p.email,
                        "phone": p.phone,
                        "date_of_birth": p.date_of_birth,
                        "mrn": p.mrn,
                        "created_at": now,
                        "deleted_at": None,
                    }
                    for p in rows
                ],
            )
            visits = [(p, a) for p in rows for a in p.appointments]
            if visits:
                await conn.execute(
                    insert(appointment_table),
                    [
                        {
                            "id": a.id,
                            "patient_id": p.patient_id,
                            "scheduled_at": a.at,
                            "notes": a.notes,
                        }
                        for p, a in visits
                    ],
                )
            # At most ten results per visit, so `visit id * 10 + n` is a unique result id.
            labs = [
                {"id": a.id * 10 + n, "appointment_id": a.id, "result": result}
                for _, a in visits
                for n, result in enumerate(a.lab_results[:10])
            ]
            if labs:
                await conn.execute(insert(lab_table), labs)
    finally:
        await engine.dispose()


SESSION_DAYS = 180
"""How far back the seeded portal sessions go: about half of them are past the GDPR pack's 90
days since the last activity."""


def sessions_table(prefix: str = "", metadata: MetaData | None = None) -> Table:
    """The table `<prefix>portal_sessions`: each patient's sign-ins to the patient portal, with
    the device's IP address, dated by when the session started and was last seen."""
    return Table(
        f"{prefix}portal_sessions",
        metadata or MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("patient_id", String(64), nullable=False),
        Column("ip_address", String(45), nullable=False),
        Column("started_at", DateTime(timezone=True), nullable=False),
        Column("last_seen_at", DateTime(timezone=True)),
    )


def portal_sessions(
    patients: Sequence[Patient], per_patient: int = 6, *, now: datetime | None = None
) -> list[dict[str, object]]:
    """Made-up sessions, `per_patient` each, spread evenly over the last SESSION_DAYS days."""
    now = now or datetime.now(UTC)
    rows: list[dict[str, object]] = []
    for n, patient in enumerate(patients):
        for k in range(per_patient):
            started = now - timedelta(days=SESSION_DAYS * (k + 0.5) / per_patient, hours=n)
            rows.append(
                {
                    "id": n * per_patient + k + 1,
                    "patient_id": patient.patient_id,
                    "ip_address": f"192.0.2.{(n * per_patient + k) % 250 + 1}",
                    "started_at": started,
                    "last_seen_at": started + timedelta(minutes=20),
                }
            )
    return rows


async def seed_sessions(
    url: str, patients: int | Sequence[Patient], prefix: str = "", per_patient: int = 6
) -> int:
    """Create `<prefix>portal_sessions` (if missing) and add each patient's sessions; how many."""
    table = sessions_table(prefix)
    rows = portal_sessions(_patients(patients), per_patient)
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(table.metadata.create_all)
            if rows:
                await conn.execute(insert(table), rows)
    finally:
        await engine.dispose()
    return len(rows)


async def drop_sql(url: str, prefix: str) -> None:
    """Drop the tables `seed_sql` and `seed_sessions` created under `prefix`."""
    metadata, *_ = hospital_tables(prefix)
    sessions_table(prefix, metadata)
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.drop_all)
    finally:
        await engine.dispose()


# --- Kafka -------------------------------------------------------------------------------------


def create_topic(
    bootstrap: str,
    topic: str,
    *,
    partitions: int = 3,
    config: dict[str, str] | None = None,
) -> None:
    """Create a compacted topic (fast compaction settings unless `config` is given)."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
    future = admin.create_topics(
        [NewTopic(topic, partitions, 1, config=config or FAST_COMPACTION)]
    )[topic]
    try:
        future.result(30)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise
    deadline = time.monotonic() + 15
    while topic not in admin.list_topics(timeout=10).topics:
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {topic} did not appear")
        time.sleep(0.1)


def seed_kafka(
    bootstrap: str, patients: int | Sequence[Patient], prefix: str = ""
) -> dict[str, tuple[int, int]]:
    """Create `<prefix>patient-profile` and publish each profile; partition and offset by id.

    Records are keyed `patient:{id}` and partitioned as a Java producer would (murmur2), so a
    tombstone for the key lands on the same partition.
    """
    topic = f"{prefix}{TOPIC}"
    create_topic(bootstrap, topic)
    producer = Producer(
        {"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "acks": "all"}
    )
    placed: dict[str, tuple[int, int]] = {}
    failures: list[str] = []

    def delivered(error: KafkaError | None, message: Message) -> None:
        if error is not None:
            failures.append(error.name())
            return
        key = (message.key() or b"").decode().removeprefix("patient:")
        placed[key] = (message.partition() or 0, message.offset() or 0)

    for patient in _patients(patients):
        producer.produce(
            topic,
            key=f"patient:{patient.patient_id}".encode(),
            value=json.dumps(patient.profile()).encode(),
            on_delivery=delivered,
        )
    if producer.flush(30) or failures:
        raise RuntimeError(f"Kafka did not take every record: {', '.join(failures) or 'timeout'}")
    return placed


def drop_kafka(bootstrap: str, prefix: str) -> None:
    """Delete the topic `seed_kafka` created under `prefix`."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
    topic = f"{prefix}{TOPIC}"
    for future in admin.delete_topics([topic]).values():
        future.result(30)


# --- Redis -------------------------------------------------------------------------------------


async def seed_redis(url: str, patients: int | Sequence[Patient], prefix: str = "") -> None:
    """Cache each patient: `patient:{id}:profile`, `patient:{id}:visits`, `session:{id}`, and
    the email index `patients:by-email`, every key under `prefix`."""
    client: Redis = Redis.from_url(url)
    try:
        pipe = client.pipeline(transaction=False)
        for p in _patients(patients):
            fields = [part for pair in p.profile().items() for part in pair]
            pipe.hset(f"{prefix}patient:{p.patient_id}:profile", items=fields)
            visits = [a.at.isoformat() for a in p.appointments]
            if visits:
                pipe.rpush(f"{prefix}patient:{p.patient_id}:visits", *visits)
            pipe.set(f"{prefix}session:{p.patient_id}", os.urandom(16).hex(), ex=3600)
            pipe.hset(f"{prefix}patients:by-email", p.email, p.patient_id)
        await pipe.execute()
    finally:
        await client.aclose()


async def drop_redis(url: str, prefix: str) -> None:
    """Remove every key under `prefix` (which must not be empty)."""
    if not prefix:
        raise ValueError("refusing to drop every key: give the prefix the seed used")
    client: Redis = Redis.from_url(url)
    try:
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            await client.unlink(key)
    finally:
        await client.aclose()


# --- blobs: exports, backups, logs ---------------------------------------------------------------


def export_blob_name(ref: str) -> str:
    """The name of a subject's export blob: by reference, never by id."""
    return f"exports/{ref}.json"


async def seed_blobs(
    connection: str,
    patients: int | Sequence[Patient],
    prefix: str = "",
    *,
    subject_key: bytes,
    tenant: str = TENANT,
) -> None:
    """Exports tagged `subject_ref=<ref>`, one whole backup under `patients-db/`, portal logs.

    Containers are `<prefix>patient-exports`, `<prefix>db-backups` and `<prefix>app-logs`.
    """
    rows = _patients(patients)
    async with BlobServiceClient.from_connection_string(connection) as service:
        for name in (EXPORTS_CONTAINER, BACKUPS_CONTAINER, LOGS_CONTAINER):
            with contextlib.suppress(ResourceExistsError):
                await service.create_container(f"{prefix}{name}")
        exports = service.get_container_client(f"{prefix}{EXPORTS_CONTAINER}")
        for p in rows:
            ref = tag_for(tenant, p.patient_id, subject_key)  # the subject reference
            await exports.upload_blob(
                export_blob_name(ref),
                json.dumps({**p.profile(), "mrn": p.mrn}).encode(),
                overwrite=True,
                tags={SUBJECT_TAG: ref},
            )
        dump = "\n".join(json.dumps({**p.profile(), "mrn": p.mrn}) for p in rows).encode()
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        backups = service.get_container_client(f"{prefix}{BACKUPS_CONTAINER}")
        await backups.upload_blob(f"{BACKUP_PREFIX}{stamp}.jsonl", dump, overwrite=True)
        logs = service.get_container_client(f"{prefix}{LOGS_CONTAINER}")
        for day, content in portal_logs(rows).items():
            await logs.upload_blob(f"{LOG_PREFIX}{day}.jsonl", content, overwrite=True)


def portal_logs(patients: Sequence[Patient], days: int = 2) -> dict[str, bytes]:
    """JSON-lines portal logs by day: each patient logs in and views results on every day."""
    start = date(2026, 11, 1)
    logs: dict[str, bytes] = {}
    for offset in range(days):
        day = start + timedelta(days=offset)
        lines = [json.dumps({"ts": f"{day}T00:00:00Z", "level": "info", "event": "portal.start"})]
        for n, p in enumerate(patients):
            at = f"{day}T08:{n % 60:02d}:00Z"
            lines.append(
                json.dumps(
                    {"ts": at, "event": "login", "patient_id": p.patient_id, "email": p.email}
                )
            )
            lines.append(
                json.dumps({"ts": at, "event": "results.viewed", "patient_id": p.patient_id})
            )
        logs[day.isoformat()] = ("\n".join(lines) + "\n").encode()
    return logs


async def drop_blobs(connection: str, prefix: str) -> None:
    """Delete the containers `seed_blobs` created under `prefix` (which must not be empty)."""
    if not prefix:
        raise ValueError("refusing to drop the shared containers: give the prefix the seed used")
    async with BlobServiceClient.from_connection_string(connection) as service:
        for name in (EXPORTS_CONTAINER, BACKUPS_CONTAINER, LOGS_CONTAINER):
            await service.delete_container(f"{prefix}{name}")


# --- everything ----------------------------------------------------------------------------------


def sql_prefix(prefix: str) -> str:
    """The table-name form of a name prefix: dashes become underscores."""
    return prefix.replace("-", "_")


@dataclass(frozen=True)
class Connections:
    """Where the hospital's systems are."""

    sql_url: str
    kafka_bootstrap: str
    redis_url: str
    blob_connection: str

    @classmethod
    def from_stack(cls) -> Connections:
        """The LETHE_STACK_* variables that `scripts/stack env` prints."""
        return cls(
            sql_url=os.environ["LETHE_STACK_SQL_URL"],
            kafka_bootstrap=os.environ["LETHE_STACK_KAFKA_BOOTSTRAP"],
            redis_url=os.environ["LETHE_STACK_REDIS_URL"],
            blob_connection=os.environ["LETHE_STACK_BLOB_CONNECTION"],
        )


async def seed_all(
    connections: Connections,
    patients: int | Sequence[Patient],
    prefix: str = "",
    *,
    subject_key: bytes,
    tenant: str = TENANT,
) -> dict[str, tuple[int, int]]:
    """Seed every system; the Kafka partition and offset of each patient's profile record.

    `prefix` is made of lower-case letters, digits and dashes (container names allow no
    more); table names take it with dashes as underscores.
    """
    rows = _patients(patients)
    placed, *_ = await asyncio.gather(
        asyncio.to_thread(seed_kafka, connections.kafka_bootstrap, rows, prefix),
        seed_sql(connections.sql_url, rows, sql_prefix(prefix)),
        seed_redis(connections.redis_url, rows, prefix),
        seed_blobs(
            connections.blob_connection, rows, prefix, subject_key=subject_key, tenant=tenant
        ),
    )
    return placed


async def drop_all(connections: Connections, prefix: str) -> None:
    """Remove everything `seed_all` created under `prefix`."""
    await asyncio.gather(
        asyncio.to_thread(drop_kafka, connections.kafka_bootstrap, prefix),
        drop_sql(connections.sql_url, sql_prefix(prefix)),
        drop_redis(connections.redis_url, prefix),
        drop_blobs(connections.blob_connection, prefix),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lethe.examples.seed`: seed the systems the LETHE_STACK_* variables point at."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=10, help="how many patients")
    parser.add_argument("--prefix", default="", help="prefix of every table, topic, key, container")
    args = parser.parse_args(argv)
    key = os.environ.get("LETHE_SUBJECT_KEY")
    if not key:
        parser.error("LETHE_SUBJECT_KEY is not set (the export blobs are tagged by reference)")
    asyncio.run(
        seed_all(
            Connections.from_stack(),
            sample_patients(args.patients),
            args.prefix,
            subject_key=base64.b64decode(key),
        )
    )
    print(f"seeded {args.patients} patients of tenant {TENANT} under prefix {args.prefix!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
