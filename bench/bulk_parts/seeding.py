"""The bulk benchmark's sample data: many subjects seeded in PostgreSQL (set-based, in the
database), Redis (pipelined) and a compacted Kafka topic, under the erasure benchmark's names,
each removed again by the run's clean-up."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench import BenchError
from bench.erasure_parts.sample_data import (
    Names,
    SqlTables,
    create_containers,
    drop_containers,
    drop_kafka,
    drop_redis,
    drop_sql,
    email_of,
    producer_for,
)
from bench.harness.cleanup import Cleanup

ID_DIGITS = 7
"""Digits of a subject's number: a million subjects keep ids of one length."""
FILLER = 2000
"""Patients besides the subjects (never erased), so no table holds only subjects."""
REDIS_CHUNK = 1000
"""Subjects seeded per pipelined round trip."""


@dataclass(frozen=True)
class BulkNames(Names):
    """The erasure benchmark's names, with subject ids of a fixed width."""

    def subject_id(self, index: int) -> str:
        """The id of the `index`th seeded subject."""
        return f"s{self.run}-{index:0{ID_DIGITS}d}"

    def filler_id(self, index: int) -> str:
        """The id of the `index`th filler patient."""
        return f"f{self.run}-{index:0{ID_DIGITS}d}"


@dataclass(frozen=True)
class Seeded:
    """The clients of the seeded systems, which the raw floor and the checks go on using."""

    engine: AsyncEngine
    tables: SqlTables
    redis: Redis
    admin: AdminClient
    bootstrap: str


def _id_sql(prefix: str, run: str, number: str) -> str:
    return f"'{prefix}{run}-' || lpad(({number})::text, {ID_DIGITS}, '0')"


async def seed_sql(engine: AsyncEngine, tables: SqlTables, names: BulkNames, count: int) -> None:
    """`count` subjects and FILLER patients, two appointments and two lab results each, made
    by the database itself (INSERT ... SELECT over generate_series)."""
    run = names.run
    who = (
        f"CASE WHEN i < {count} THEN {_id_sql('s', run, 'i')} "
        f"ELSE {_id_sql('f', run, f'i - {count}')} END"
    )
    last = count + FILLER - 1
    patients = (
        f'INSERT INTO "{names.patients}" '
        "(patient_id, full_name, email, phone, date_of_birth, mrn, deleted_at) "
        f"SELECT p.id, 'Patient ' || i, p.id || '@bench.invalid', "
        "'+44 20 7946 ' || lpad((i % 10000)::text, 4, '0'), "
        "make_date(1950 + i % 50, 1 + i % 12, 1 + i % 28), 'MRN' || lpad(i::text, 8, '0'), NULL "
        f"FROM generate_series(0, {last}) AS i, LATERAL (SELECT {who} AS id) AS p"
    )
    appointments = (
        f'INSERT INTO "{names.appointments}" (id, patient_id, notes) '
        f"SELECT i * 2 + v + 1, {who}, 'visit ' || v "
        f"FROM generate_series(0, {last}) AS i, generate_series(0, 1) AS v"
    )
    labs = (
        f'INSERT INTO "{names.labs}" (id, appointment_id, result) '
        f"SELECT i * 2 + v + 1, i * 2 + v + 1, 'ok' "
        f"FROM generate_series(0, {last}) AS i, generate_series(0, 1) AS v"
    )
    async with engine.begin() as conn:
        await conn.run_sync(tables.metadata.create_all)
        for statement in (patients, appointments, labs):
            await conn.execute(text(statement))
        for table in (tables.patients, tables.appointments, tables.labs):
            await conn.execute(text(f'ANALYZE "{table.name}"'))


async def seed_redis(redis: Redis, names: Names, subjects: list[str]) -> None:
    """Two patient keys, a session key and an e-mail hash field per subject."""
    for start in range(0, len(subjects), REDIS_CHUNK):
        pipe = redis.pipeline(transaction=False)
        for subject_id in subjects[start : start + REDIS_CHUNK]:
            pipe.set(f"{names.redis_prefix}:patient:{subject_id}:profile", "{}")
            pipe.set(f"{names.redis_prefix}:patient:{subject_id}:prefs", "{}")
            pipe.set(f"{names.redis_prefix}:session:{subject_id}", "token")
            pipe.hset(names.email_hash, email_of(subject_id), subject_id)
        await pipe.execute()


def produce_all(producer: Producer, topic: str, keys: list[bytes], value: bytes | None) -> None:
    """Produce one record per key (waiting for room when the local queue is full), then flush."""
    for key in keys:
        while True:
            try:
                producer.produce(topic, key=key, value=value)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    if producer.flush(120) != 0:
        raise BenchError("Kafka did not take every record")


def seed_kafka(admin: AdminClient, bootstrap: str, names: Names, subjects: list[str]) -> None:
    """The compacted topic (3 partitions) and one profile record per subject (blocking)."""
    config = {"cleanup.policy": "compact", "max.compaction.lag.ms": "86400000"}
    admin.create_topics([NewTopic(names.topic, 3, 1, config=config)])[names.topic].result(30)
    deadline = time.monotonic() + 30
    while names.topic not in admin.list_topics(timeout=10).topics:
        if time.monotonic() > deadline:
            raise BenchError(f"topic {names.topic} did not appear")
        time.sleep(0.1)
    keys = [f"patient:{subject_id}".encode() for subject_id in subjects]
    produce_all(producer_for(bootstrap), names.topic, keys, b"{}")


async def seed_all(
    cleanup: Cleanup,
    names: BulkNames,
    count: int,
    *,
    sql_url: str,
    redis_url: str,
    bootstrap: str,
    blob_connection: str,
) -> Seeded:
    """Seed subjects 0 .. count-1 everywhere (and the filler in SQL and Redis), create the
    deferred steps' empty containers; `cleanup` removes all of it and closes the clients."""
    engine = create_async_engine(sql_url, pool_size=10)
    redis = Redis.from_url(redis_url)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    cleanup.undo("the SQL connections", engine.dispose)
    cleanup.undo("the Redis connection", redis.aclose)
    tables = SqlTables.declare(names)
    subjects = [names.subject_id(i) for i in range(count)]
    filler = [names.filler_id(i) for i in range(FILLER)]
    cleanup.undo("the tables", lambda: drop_sql(engine, tables))
    await seed_sql(engine, tables, names, count)
    cleanup.undo("the Redis keys", lambda: drop_redis(redis, names))
    await seed_redis(redis, names, subjects + filler)
    cleanup.undo("the Kafka topic", lambda: drop_kafka(admin, names))
    await asyncio.to_thread(seed_kafka, admin, bootstrap, names, subjects)
    cleanup.undo("the blob containers", lambda: drop_containers(blob_connection, names))
    await create_containers(blob_connection, names)
    return Seeded(engine, tables, redis, admin, bootstrap)
