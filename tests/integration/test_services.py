"""Smoke tests of the stack's services, reached as Lethe reaches them.

Each connection comes from Lethe's configuration (`lethe.kernel.config`: the settings for
Temporal and Lethe's own stores, `connection` for the variables a data map names), each service
is checked by Lethe's probe for it (`lethe.kernel.probes`), and then used with its own client on
the same connection. A probe of a service that is down says which, and never the secret.
"""

from __future__ import annotations

import asyncio
import re
import uuid

import pytest
from azure.storage.blob.aio import BlobServiceClient
from confluent_kafka import Consumer, KafkaError, Message, Producer
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    NewTopic,
)
from redis.asyncio import Redis
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from lethe.kernel import probes
from lethe.kernel.config import Settings, connection
from lethe.kernel.errors import ServiceUnavailable

SECRET = "s3cret-not-shown"
DOWN = "127.0.0.1:1"
"""A port nothing listens on."""


def _connection(variable: str) -> str:
    """The connection a data map names by `variable`, read as the connectors read it."""
    return connection(variable).get_secret_value()


@pytest.fixture(scope="module")
def sql_url() -> str:
    """The stack's data-system database (LETHE_STACK_SQL_URL)."""
    return _connection("LETHE_STACK_SQL_URL")


@pytest.fixture(scope="module")
def redis_url() -> str:
    """The stack's Redis (LETHE_STACK_REDIS_URL)."""
    return _connection("LETHE_STACK_REDIS_URL")


@pytest.fixture(scope="module")
def kafka_bootstrap() -> str:
    """The stack's Kafka broker (LETHE_STACK_KAFKA_BOOTSTRAP)."""
    return _connection("LETHE_STACK_KAFKA_BOOTSTRAP")


@pytest.fixture(scope="module")
def blob_connection() -> str:
    """The stack's Azurite (LETHE_STACK_BLOB_CONNECTION)."""
    return _connection("LETHE_STACK_BLOB_CONNECTION")


async def test_every_probe_answers_with_what_it_found(
    settings: Settings, sql_url: str, redis_url: str, kafka_bootstrap: str, blob_connection: str
) -> None:
    temporal = await probes.probe_temporal(settings.temporal_address, settings.temporal_namespace)
    assert temporal == f"Temporal at {settings.temporal_address}: SERVING"
    for url in (sql_url, settings.store_url.get_secret_value(), settings.key_store_url):
        shown = make_url(url).render_as_string(hide_password=True)
        assert re.fullmatch(
            rf"database at {re.escape(shown)}: version \d+\.\d+", await probes.probe_sql(url)
        )
    redis = make_url(redis_url)
    assert re.fullmatch(
        rf"Redis at redis://{redis.host}:{redis.port}: version \d+\.\d+\.\d+",
        await probes.probe_redis(redis_url),
    )
    assert await probes.probe_kafka(kafka_bootstrap) == f"Kafka at {kafka_bootstrap}: 1 broker(s)"
    endpoint = dict(part.split("=", 1) for part in blob_connection.split(";") if "=" in part)
    assert (
        await probes.probe_blob(blob_connection)
        == f"blob service at {endpoint['BlobEndpoint']}: answering"
    )


async def test_a_probe_of_a_service_that_is_down_names_it_and_keeps_its_secret() -> None:
    down = {
        "Temporal at": probes.probe_temporal(DOWN),
        "database at": probes.probe_sql(f"postgresql+psycopg://lethe:{SECRET}@{DOWN}/lethe"),
        "Redis at": probes.probe_redis(f"redis://:{SECRET}@{DOWN}/0"),
        "Kafka at": probes.probe_kafka(DOWN),
        "blob service at": probes.probe_blob(
            f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={SECRET};"
            f"BlobEndpoint=http://{DOWN}/devstoreaccount1;"
        ),
    }
    answers = await asyncio.gather(*down.values(), return_exceptions=True)
    for service, answer in zip(down, answers, strict=True):
        assert isinstance(answer, ServiceUnavailable), (service, answer)
        assert str(answer).startswith(service), answer
        assert DOWN in str(answer) and SECRET not in str(answer)


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
