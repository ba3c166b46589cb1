"""The raw floor's Kafka: what the Kafka connector's `erase_batch` does for a batch keyed by
subject, done directly. Every tombstone produced (each with a delivery report), then one flush;
then the verification reads: the topic's settings described once, and each partition read
back from the batch's first tombstone to its last (the partitions at once), every tombstone
checked at its offset."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

from confluent_kafka import KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource  # type: ignore[attr-defined]

from bench import BenchError
from bench.erasure_parts.sample_data import KAFKA_TIMEOUT
from lethe.activities.kafka_scan import reader

READ_TIMEOUT = 15.0
SEARCH_BATCH = 500
"""Records one consume call takes (the connector's read-back, activities/kafka.py)."""


class KafkaFloor:
    """Tombstones a batch's keys and reads them back."""

    def __init__(self, producer: Producer, admin: AdminClient, bootstrap: str, topic: str) -> None:
        """Use this producer (the connector's settings) and admin client."""
        self.producer = producer
        self.admin = admin
        self.bootstrap = bootstrap
        self.topic = topic

    async def erase(self, ids: list[str]) -> None:
        """Tombstone every key, flush once, then verify."""
        places = await asyncio.to_thread(self._tombstones, [f"patient:{i}".encode() for i in ids])
        await asyncio.to_thread(self._settings)
        by_partition: dict[int, dict[int, bytes]] = {}
        for partition, offset, key in places:
            by_partition.setdefault(partition, {})[offset] = key
        await asyncio.gather(
            *(asyncio.to_thread(self._read_back, p, wanted) for p, wanted in by_partition.items())
        )

    def _tombstones(self, keys: list[bytes]) -> list[tuple[int, int, bytes]]:
        places: list[tuple[int, int, bytes]] = []
        errors: list[KafkaError] = []

        def on_delivery(error: KafkaError | None, message: Message) -> None:
            if error is not None:
                errors.append(error)
                return
            key = message.key()
            partition, offset = message.partition(), message.offset()
            if partition is None or offset is None or key is None:
                raise BenchError("a delivery report without a place")
            places.append((partition, offset, key))

        for key in keys:
            while True:
                try:
                    self.producer.produce(self.topic, key=key, value=None, on_delivery=on_delivery)
                    break
                except BufferError:
                    self.producer.poll(0.1)
        if self.producer.flush(KAFKA_TIMEOUT + 5) != 0 or errors or len(places) != len(keys):
            raise BenchError("floor: not every tombstone was delivered")
        return places

    def _settings(self) -> None:
        resource = ConfigResource(ConfigResource.Type.TOPIC, self.topic)
        self.admin.describe_configs([resource])[resource].result(READ_TIMEOUT)

    def _read_back(self, partition: int, wanted: Mapping[int, bytes]) -> None:
        consumer = reader(self.bootstrap, "lethe-bench-verify", partition_eof=True)
        try:
            consumer.get_watermark_offsets(
                TopicPartition(self.topic, partition), timeout=READ_TIMEOUT
            )
            pending = sorted(wanted)
            consumer.assign([TopicPartition(self.topic, partition, pending[0])])
            deadline = time.monotonic() + READ_TIMEOUT
            while pending:
                if time.monotonic() > deadline:
                    raise BenchError("floor: a partition was not read back in time")
                for message in consumer.consume(SEARCH_BATCH, timeout=0.5):
                    at = message.offset()
                    if message.error() is not None or at is None:
                        continue
                    while pending and pending[0] <= at:
                        offset = pending.pop(0)
                        if offset != at or message.key() != wanted[offset] or message.value():
                            raise BenchError("floor: a tombstone was not where it was written")
        finally:
            consumer.close()
