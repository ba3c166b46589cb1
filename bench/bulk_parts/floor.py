"""The raw floor of a bulk erasure: the same batched work as Lethe's immediate phase, done
directly. Batches in sequence; in a batch, every table, Redis and Kafka in parallel (as the
workflow runs its steps), each erasing then making the connector's verification reads."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from datetime import UTC, datetime

from bench import BenchError
from bench.bulk_parts.floor_kafka import KafkaFloor
from bench.bulk_parts.floor_redis import RedisFloor
from bench.bulk_parts.floor_sql import TableWork, erase_table, table_work, verify_table
from bench.bulk_parts.seeding import Seeded
from bench.erasure_parts.sample_data import Names, producer_for
from bench.harness.timings import Segments


class BulkFloor:
    """Erases batches of seeded subjects directly, timing each system per batch."""

    def __init__(self, seeded: Seeded, names: Names) -> None:
        """Use the seeded systems' clients (and a producer with the connector's settings)."""
        self.seeded = seeded
        self.redis = RedisFloor(seeded.redis, names)
        producer = producer_for(seeded.bootstrap)
        self.kafka = KafkaFloor(producer, seeded.admin, seeded.bootstrap, names.topic)
        self.segments = Segments(note="per batch of the raw floor")

    async def _timed(self, name: str, work: Awaitable[None]) -> None:
        begun = time.perf_counter()
        await work
        self.segments.add(name, time.perf_counter() - begun)

    async def _table(self, work: TableWork, ids: list[str]) -> None:
        await erase_table(self.seeded.engine, work, ids)
        if await verify_table(self.seeded.engine, work, ids):
            raise BenchError(f"floor: rows of {work.table.name} not erased")

    async def _sql(self, ids: list[str]) -> None:
        works = table_work(self.seeded.tables, datetime.now(UTC))
        await asyncio.gather(*(self._table(work, ids) for work in works))

    async def erase_batch(self, ids: list[str]) -> None:
        """One batch: every system in parallel, each erasing and verifying."""
        await self._timed("batch", self._systems(ids))

    async def _systems(self, ids: list[str]) -> None:
        await asyncio.gather(
            self._timed("  sql (3 tables together)", self._sql(ids)),
            self._timed("  redis", self.redis.erase(ids)),
            self._timed("  kafka", self.kafka.erase(ids)),
        )

    async def erase_all(self, ids: list[str], batch_size: int) -> float:
        """Every batch in sequence: the total seconds."""
        begun = time.perf_counter()
        for start in range(0, len(ids), batch_size):
            await self.erase_batch(ids[start : start + batch_size])
        return time.perf_counter() - begun
