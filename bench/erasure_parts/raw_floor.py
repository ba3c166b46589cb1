"""The raw floor: the same destructive work as Lethe's immediate phase, done directly.

The statements the connectors issue (the same SQLAlchemy UPDATEs through the same psycopg async
driver, one transaction per table), Redis SCAN + UNLINK and HDEL, and a Kafka tombstone produce
+ flush with the connector's producer settings; a subject's systems in parallel, as Lethe runs
them; no Temporal, no verification.
"""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime

from confluent_kafka import KafkaError, Message, Producer
from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.dml import Update

from bench import BenchError
from bench.erasure_parts.sample_data import KAFKA_TIMEOUT, Names, SqlTables, email_of


class Floor:
    """Erases the seeded subjects directly; nothing is created per call."""

    def __init__(
        self, engine: AsyncEngine, tables: SqlTables, redis: Redis, producer: Producer, names: Names
    ) -> None:
        """Use these clients."""
        self.engine = engine
        self.tables = tables
        self.redis = redis
        self.producer = producer
        self.names = names

    async def erase(self, subject_id: str) -> None:
        """Erase one subject: every table, Redis and the Kafka tombstone, in parallel."""
        now = datetime.now(UTC)
        await asyncio.gather(
            *(self._sql(statement) for statement in self.tables.erase_statements(subject_id, now)),
            self._redis(subject_id),
            asyncio.to_thread(self._tombstone, f"patient:{subject_id}".encode()),
        )

    async def _sql(self, statement: Update) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(statement)

    async def _redis(self, subject_id: str) -> None:
        prefix = self.names.redis_prefix
        cursor = 0
        while True:
            cursor, keys = await self.redis.scan(
                cursor, match=f"{prefix}:patient:{subject_id}:*", count=1000
            )
            if keys:
                await self.redis.unlink(*keys)
            if cursor == 0:
                break
        await self.redis.unlink(f"{prefix}:session:{subject_id}")
        await self.redis.hdel(self.names.email_hash, email_of(subject_id))

    def _tombstone(self, key: bytes) -> None:
        reported = threading.Event()
        errors: list[KafkaError] = []

        def on_delivery(error: KafkaError | None, _: Message) -> None:
            if error is not None:
                errors.append(error)
            reported.set()

        self.producer.produce(self.names.topic, key=key, value=None, on_delivery=on_delivery)
        self.producer.flush(KAFKA_TIMEOUT + 5)
        if not reported.wait(5.0) or errors:
            raise BenchError("a floor tombstone was not delivered")

    async def check(self, subjects: list[str]) -> None:
        """Every one of these subjects' patient row is soft-deleted and their keys are gone."""
        patients = self.tables.patients
        async with self.engine.connect() as conn:
            left = (
                await conn.execute(
                    select(func.count())
                    .select_from(patients)
                    .where(patients.c.patient_id.in_(subjects), patients.c.deleted_at.is_(None))
                )
            ).scalar_one()
        keys = sum(
            [
                await self.redis.exists(f"{self.names.redis_prefix}:session:{subject_id}")
                for subject_id in subjects
            ]
        )
        if left or keys:
            raise BenchError(f"the floor left {left} row(s) and {keys} key(s) of its subjects")


async def measure(
    floor: Floor, warm: list[str], one_by_one: list[str], at_once: list[str]
) -> tuple[list[float], float]:
    """Erase `warm` (not counted), then `one_by_one` for latency and `at_once` all together for
    throughput, and check them all: each latency in seconds, and erasures per second at once."""
    for subject_id in warm:
        await floor.erase(subject_id)
    times = []
    for subject_id in one_by_one:
        begun = time.perf_counter()
        await floor.erase(subject_id)
        times.append(time.perf_counter() - begun)
    begun = time.perf_counter()
    await asyncio.gather(*(floor.erase(subject_id) for subject_id in at_once))
    rate = len(at_once) / (time.perf_counter() - begun)
    await floor.check(one_by_one + at_once)
    return times, rate
