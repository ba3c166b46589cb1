"""The erasure benchmark's sample data: every name a run creates, and the subjects seeded under
them in PostgreSQL, Redis, Kafka and Azurite (with how to remove each again)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import TypeVar

from azure.storage.blob.aio import BlobServiceClient
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from redis.asyncio import Redis
from sqlalchemy import (
    BigInteger,
    Column,
    Date,
    DateTime,
    MetaData,
    String,
    Table,
    Text,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.sql.dml import Update

from bench import BenchError
from bench.harness.cleanup import Cleanup
from lethe.contracts import ErasureRequest, Subject

TENANT = "bench"
FILLER_PATIENTS = 2000
"""Patients besides the subjects, so the tables are not tiny."""
KAFKA_TIMEOUT = 15.0

T = TypeVar("T")


@dataclass(frozen=True)
class Names:
    """Every name this run creates, derived from one random id."""

    run: str

    @property
    def region(self) -> str:
        """The region, and so the task queue `lethe-bench<id>`."""
        return f"bench{self.run}"

    @property
    def control_queue(self) -> str:
        """The control queue of this run's worker."""
        return f"lethe-bench-control-{self.run}"

    @property
    def floor_region(self) -> str:
        """The orchestration floor's region, and so its child queue `lethe-bench<id>-floor`."""
        return f"bench{self.run}-floor"

    @property
    def floor_control_queue(self) -> str:
        """The orchestration floor's control queue."""
        return f"lethe-bench-floor-control-{self.run}"

    @property
    def patients(self) -> str:
        """The patients table (soft delete)."""
        return f"bench_{self.run}_patients"

    @property
    def appointments(self) -> str:
        """The appointments table (pseudonymise)."""
        return f"bench_{self.run}_appointments"

    @property
    def labs(self) -> str:
        """The lab results table, found through appointments (pseudonymise)."""
        return f"bench_{self.run}_lab_results"

    @property
    def topic(self) -> str:
        """The compacted Kafka topic keyed by subject."""
        return f"bench-{self.run}-profile"

    @property
    def redis_prefix(self) -> str:
        """The prefix of every Redis key this run writes."""
        return f"bench:{self.run}"

    @property
    def email_hash(self) -> str:
        """The shared Redis hash from e-mail address to subject."""
        return f"{self.redis_prefix}:patients:by-email"

    @property
    def store_database(self) -> str:
        """The PostgreSQL database of this run's Lethe store."""
        return f"lethe_bench_{self.run}"

    @property
    def backup_container(self) -> str:
        """The (empty) Azurite container of the deferred backup step."""
        return f"bench-{self.run}-exports"

    @property
    def log_container(self) -> str:
        """The (empty) Azurite container of the deferred log step."""
        return f"bench-{self.run}-logs"

    def subject_id(self, index: int) -> str:
        """The id of the `index`th seeded subject."""
        return f"s{self.run}-{index:05d}"

    def filler_id(self, index: int) -> str:
        """The id of the `index`th filler patient (never erased)."""
        return f"f{self.run}-{index:05d}"


def email_of(subject_id: str) -> str:
    """The synthetic e-mail identity of a seeded subject."""
    return f"{subject_id}@bench.invalid"


def request_for(subject_id: str) -> ErasureRequest:
    """The erasure request of one seeded subject."""
    return ErasureRequest(
        subject=Subject(
            tenant=TENANT, subject_id=subject_id, identities={"email": email_of(subject_id)}
        ),
        requested_by="bench",
        reason="benchmark",
    )


def _chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --- SQL -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SqlTables:
    """This run's three tables, declared (the floor does not reflect them)."""

    metadata: MetaData
    patients: Table
    appointments: Table
    labs: Table

    @classmethod
    def declare(cls, names: Names) -> SqlTables:
        """Declare the tables; every personal column is nullable, so erasure clears to NULL."""
        metadata = MetaData()
        patients = Table(
            names.patients,
            metadata,
            Column("patient_id", String(64), primary_key=True),
            Column("full_name", Text),
            Column("email", Text),
            Column("phone", Text),
            Column("date_of_birth", Date),
            Column("mrn", Text),
            Column("deleted_at", DateTime(timezone=True)),
        )
        appointments = Table(
            names.appointments,
            metadata,
            Column("id", BigInteger, primary_key=True, autoincrement=False),
            Column("patient_id", String(64), nullable=False, index=True),
            Column("notes", Text),
        )
        labs = Table(
            names.labs,
            metadata,
            Column("id", BigInteger, primary_key=True, autoincrement=False),
            Column("appointment_id", BigInteger, nullable=False, index=True),
            Column("result", Text),
        )
        return cls(metadata, patients, appointments, labs)

    def erase_statements(self, subject_id: str, now: datetime) -> list[Update]:
        """The UPDATEs the SQL connector issues for one subject, one per table."""
        patients, appointments, labs = self.patients, self.appointments, self.labs
        deleted_at = patients.c.deleted_at
        path = appointments.alias("lethe_path_1")
        return [
            update(patients)
            .where(patients.c.patient_id == subject_id)
            .values(
                full_name=None,
                email=None,
                phone=None,
                date_of_birth=None,
                mrn=None,
                deleted_at=func.coalesce(deleted_at, literal(now, deleted_at.type)),
            ),
            update(appointments).where(appointments.c.patient_id == subject_id).values(notes=None),
            update(labs)
            .where(
                labs.c.appointment_id.in_(select(path.c.id).where(path.c.patient_id == subject_id))
            )
            .values(result=None),
        ]


async def seed_sql(engine: AsyncEngine, tables: SqlTables, subjects: list[str]) -> None:
    """Create the tables; two appointments and two lab results per subject and filler patient."""
    patients: list[dict[str, object]] = []
    appointments: list[dict[str, object]] = []
    labs: list[dict[str, object]] = []
    for index, subject_id in enumerate(subjects):
        patients.append(
            {
                "patient_id": subject_id,
                "full_name": f"Patient {index}",
                "email": email_of(subject_id),
                "phone": f"+44 20 7946 {index % 10000:04d}",
                "date_of_birth": date(1950 + index % 50, 1 + index % 12, 1 + index % 28),
                "mrn": f"MRN{index:08d}",
                "deleted_at": None,
            }
        )
        for visit in range(2):
            appointment_id = index * 2 + visit + 1
            appointments.append(
                {"id": appointment_id, "patient_id": subject_id, "notes": f"visit {visit}"}
            )
            labs.append({"id": appointment_id, "appointment_id": appointment_id, "result": "ok"})
    async with engine.begin() as conn:
        await conn.run_sync(tables.metadata.create_all)
        for table, rows in (
            (tables.patients, patients),
            (tables.appointments, appointments),
            (tables.labs, labs),
        ):
            for chunk in _chunks(rows, 1000):
                await conn.execute(insert(table), list(chunk))
        for table in (tables.patients, tables.appointments, tables.labs):
            await conn.execute(text(f'ANALYZE "{table.name}"'))


async def drop_sql(engine: AsyncEngine, tables: SqlTables) -> None:
    """Drop the run's tables."""
    async with engine.begin() as conn:
        await conn.run_sync(tables.metadata.drop_all)


# --- Redis -----------------------------------------------------------------------------------


async def seed_redis(redis: Redis, names: Names, subjects: list[str]) -> None:
    """Two patient keys, a session key and an e-mail hash field per subject and filler."""
    for chunk in _chunks(subjects, 500):
        pipe = redis.pipeline(transaction=False)
        for subject_id in chunk:
            pipe.set(f"{names.redis_prefix}:patient:{subject_id}:profile", "{}")
            pipe.set(f"{names.redis_prefix}:patient:{subject_id}:prefs", "{}")
            pipe.set(f"{names.redis_prefix}:session:{subject_id}", "token")
            pipe.hset(names.email_hash, email_of(subject_id), subject_id)
        await pipe.execute()


async def scan_batches(redis: Redis, match: str) -> AsyncIterator[list[bytes | str]]:
    """The keys matching `match`, a SCAN batch at a time."""
    cursor = 0
    while True:
        cursor, keys = await redis.scan(cursor, match=match, count=1000)
        if keys:
            yield keys
        if cursor == 0:
            return


async def drop_redis(redis: Redis, names: Names) -> None:
    """Remove every key of the run."""
    async for batch in scan_batches(redis, f"{names.redis_prefix}:*"):
        await redis.unlink(*batch)


# --- Kafka -----------------------------------------------------------------------------------


def producer_for(bootstrap: str) -> Producer:
    """A producer with the Kafka connector's settings (idempotent, acks=all, murmur2)."""
    return Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "partitioner": "murmur2_random",
            "message.timeout.ms": int(KAFKA_TIMEOUT * 1000),
        }
    )


def seed_kafka(admin: AdminClient, bootstrap: str, names: Names, subjects: list[str]) -> None:
    """Create the compacted topic and one profile record per subject (blocking)."""
    config = {"cleanup.policy": "compact", "max.compaction.lag.ms": "86400000"}
    admin.create_topics([NewTopic(names.topic, 3, 1, config=config)])[names.topic].result(30)
    deadline = time.monotonic() + 30
    while names.topic not in admin.list_topics(timeout=10).topics:
        if time.monotonic() > deadline:
            raise BenchError(f"topic {names.topic} did not appear")
        time.sleep(0.1)
    producer = producer_for(bootstrap)
    for subject_id in subjects:
        producer.produce(names.topic, key=f"patient:{subject_id}".encode(), value=b"{}")
        producer.poll(0)
    if producer.flush(60) != 0:
        raise BenchError("Kafka did not take the seed records")


async def drop_kafka(admin: AdminClient, names: Names) -> None:
    """Delete the run's topic."""
    futures = admin.delete_topics([names.topic], operation_timeout=30)
    await asyncio.to_thread(futures[names.topic].result, 60)


# --- blob containers -------------------------------------------------------------------------


def containers(names: Names) -> list[str]:
    """The deferred steps' containers."""
    return [names.backup_container, names.log_container]


async def create_containers(connection: str, names: Names) -> None:
    """The deferred steps' containers, empty: preflight refuses a step whose container is gone."""
    async with BlobServiceClient.from_connection_string(connection) as service:
        for container in containers(names):
            await service.create_container(container)


async def drop_containers(connection: str, names: Names) -> None:
    """Delete the deferred steps' containers."""
    async with BlobServiceClient.from_connection_string(connection) as service:
        for container in containers(names):
            await service.delete_container(container)


# --- all of it -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seeded:
    """The clients of the seeded systems that the raw floor goes on using."""

    engine: AsyncEngine
    tables: SqlTables
    redis: Redis


async def seed_all(
    cleanup: Cleanup,
    names: Names,
    subjects: list[str],
    filler: list[str],
    *,
    sql_url: str,
    redis_url: str,
    bootstrap: str,
    blob_connection: str,
) -> Seeded:
    """Seed the subjects (and, in SQL and Redis, the filler patients) in every system and create
    the empty containers; `cleanup` removes all of it, and closes the clients, when it unwinds."""
    engine = create_async_engine(sql_url)
    redis = Redis.from_url(redis_url)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    cleanup.undo("the SQL connections", engine.dispose)
    cleanup.undo("the Redis connection", redis.aclose)
    tables = SqlTables.declare(names)
    cleanup.undo("the tables", lambda: drop_sql(engine, tables))
    await seed_sql(engine, tables, subjects + filler)
    cleanup.undo("the Redis keys", lambda: drop_redis(redis, names))
    await seed_redis(redis, names, subjects + filler)
    cleanup.undo("the Kafka topic", lambda: drop_kafka(admin, names))
    await asyncio.to_thread(seed_kafka, admin, bootstrap, names, subjects)
    cleanup.undo("the blob containers", lambda: drop_containers(blob_connection, names))
    await create_containers(blob_connection, names)
    return Seeded(engine, tables, redis)
