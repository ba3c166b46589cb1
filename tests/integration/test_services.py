"""Smoke tests of the stack's data services, reached through Lethe's settings and probes."""

from __future__ import annotations

import asyncio
import uuid

from azure.storage.blob.aio import BlobServiceClient
from confluent_kafka import Consumer, KafkaError, Message, Producer
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    NewTopic,
)
from redis.asyncio import Redis
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select
from sqlalchemy.ext.asyncio import create_async_engine


def _name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


async def test_postgresql_through_sqlalchemy(sql_url: str) -> None:
    engine = create_async_engine(sql_url)
    table = Table(
        _name("smoke_"), MetaData(), Column("id", Integer, primary_key=True), Column("note", String)
    )
    try:
        async with engine.begin() as conn:
            await conn.run_sync(table.metadata.create_all)
            await conn.execute(insert(table), [{"id": 1, "note": "a"}, {"id": 2, "note": "b"}])
        async with engine.connect() as conn:
            rows = (await conn.execute(select(table.c.note).order_by(table.c.id))).scalars().all()
            assert conn.dialect.name == "postgresql"
        assert rows == ["a", "b"]
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(table.metadata.drop_all)
        await engine.dispose()


async def test_redis_set_scan_unlink(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    prefix = _name("smoke:")
    try:
        await client.set(f"{prefix}:a", "1")
        await client.hset(f"{prefix}:h", mapping={"email": "x", "keep": "y"})
        found = sorted([k.decode() async for k in client.scan_iter(match=f"{prefix}:*")])
        assert found == [f"{prefix}:a", f"{prefix}:h"]
        assert await client.unlink(*found) == 2
        assert await client.exists(*found) == 0
    finally:
        await client.aclose()


def _kafka_round_trip(bootstrap: str) -> dict[str, str]:
    topic = _name("smoke-")
    admin = AdminClient({"bootstrap.servers": bootstrap})
    created = admin.create_topics(
        [NewTopic(topic, 1, 1, config={"cleanup.policy": "compact", "segment.ms": "60000"})]
    )
    created[topic].result(timeout=30)
    try:
        delivered: list[Message] = []
        producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})

        def on_delivery(error: KafkaError | None, message: Message) -> None:
            assert error is None, error
            delivered.append(message)

        producer.produce(topic, key=b"patient:1", value=b"v1", on_delivery=on_delivery)
        producer.produce(topic, key=b"patient:1", value=None, on_delivery=on_delivery)
        assert producer.flush(30) == 0
        assert [m.offset() for m in delivered] == [0, 1]

        consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": topic, "auto.offset.reset": "earliest"}
        )
        consumer.subscribe([topic])
        seen: list[tuple[bytes | None, bytes | None]] = []
        try:
            for _ in range(60):
                message = consumer.poll(1.0)
                if message is not None and message.error() is None:
                    seen.append((message.key(), message.value()))
                if len(seen) == 2:
                    break
        finally:
            consumer.close()
        assert seen == [(b"patient:1", b"v1"), (b"patient:1", None)]

        described = admin.describe_configs([ConfigResource("topic", topic)])
        configs = next(iter(described.values())).result(timeout=30)
        return {name: entry.value for name, entry in configs.items()}
    finally:
        admin.delete_topics([topic])[topic].result(timeout=30)


async def test_kafka_produce_consume_and_describe_configs(kafka_bootstrap: str) -> None:
    configs = await asyncio.to_thread(_kafka_round_trip, kafka_bootstrap)
    assert configs["cleanup.policy"] == "compact"
    assert configs["segment.ms"] == "60000"
    assert int(configs["max.compaction.lag.ms"]) > 0


async def test_azurite_upload_and_find_by_tags(blob_connection: str) -> None:
    container_name = _name("smoke-")
    ref = uuid.uuid4().hex
    async with BlobServiceClient.from_connection_string(blob_connection) as service:
        container = await service.create_container(container_name)
        try:
            await container.upload_blob("backups/one.json", b"{}", tags={"subject": ref})
            await container.upload_blob("backups/other.json", b"{}", tags={"subject": "other"})
            found = [
                blob.name async for blob in service.find_blobs_by_tags(f"\"subject\" = '{ref}'")
            ]
            assert found == ["backups/one.json"]
        finally:
            await container.delete_container()
