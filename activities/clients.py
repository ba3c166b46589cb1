"""The clients a worker's connectors share: opened on first use, closed when the worker stops.

One `Clients` belongs to one worker (or one test session) and to the event loop it runs on:
redis-py and aiohttp connections cannot move between loops. Nothing here is module-global.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from azure.storage.blob.aio import BlobServiceClient, LinearRetry
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from redis.asyncio import Redis
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from lethe.activities.blob_checks import ContainerChecks
from lethe.activities.kafka_scan import Readers
from lethe.activities.sql_schema import SchemaCache
from lethe.kernel.errors import ConfigurationError

SQL_CONNECT_TIMEOUT_SECONDS = 5
REDIS_TIMEOUT_SECONDS = 10.0
BLOB_CONNECTION_TIMEOUT_SECONDS = 5
BLOB_READ_TIMEOUT_SECONDS = 60
BLOB_RETRY = LinearRetry(backoff=1, retry_total=2, random_jitter_range=1)
"""The SDK's own retries stay short: Temporal retries the activity with backoff."""


@dataclass
class Clients:
    """Every connector client of one worker, one per connection string, made on first use."""

    _sql: dict[str, AsyncEngine] = field(default_factory=dict)
    _schemas: dict[str, SchemaCache] = field(default_factory=dict)
    _redis: dict[str, Redis] = field(default_factory=dict)
    _blob: dict[str, BlobServiceClient] = field(default_factory=dict)
    _blob_checks: dict[str, ContainerChecks] = field(default_factory=dict)
    _producers: dict[str, Producer] = field(default_factory=dict)
    _admins: dict[str, AdminClient] = field(default_factory=dict)
    _readers: dict[str, Readers] = field(default_factory=dict)
    kafka_brokers: dict[str, dict[str, str]] = field(default_factory=dict)
    """The brokers' static settings per cluster, read once."""
    _closed: bool = False

    def sql_engine(self, url: str) -> AsyncEngine:
        """The async engine for a connection string."""
        engine = self._sql.get(url)
        if engine is None:
            self._check_open()
            connect_args: dict[str, object] = (
                {"connect_timeout": SQL_CONNECT_TIMEOUT_SECONDS}
                if url.startswith("postgresql")
                else {}
            )
            try:
                engine = create_async_engine(url, pool_pre_ping=True, connect_args=connect_args)
            except (SQLAlchemyError, ValueError, ImportError) as exc:
                raise ConfigurationError(
                    f"the connection is not a usable async SQLAlchemy URL ({type(exc).__name__});"
                    " use postgresql+psycopg:// or sqlite+aiosqlite://"
                ) from None
            self._sql[url] = engine
        return engine

    def sql_schemas(self, url: str) -> SchemaCache:
        """The kept descriptions of the tables of the database at `url`."""
        return self._schemas.setdefault(url, SchemaCache())

    def redis(self, url: str) -> Redis:
        """The Redis client for a URL."""
        client = self._redis.get(url)
        if client is None:
            self._check_open()
            client = self._redis[url] = Redis.from_url(
                url,
                socket_timeout=REDIS_TIMEOUT_SECONDS,
                socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
            )
        return client

    def blob_service(self, connection_string: str) -> BlobServiceClient:
        """The blob-service client for an Azure Storage connection string."""
        client = self._blob.get(connection_string)
        if client is None:
            self._check_open()
            try:
                client = BlobServiceClient.from_connection_string(
                    connection_string,
                    retry_policy=BLOB_RETRY,
                    connection_timeout=BLOB_CONNECTION_TIMEOUT_SECONDS,
                    read_timeout=BLOB_READ_TIMEOUT_SECONDS,
                )
            except ValueError:
                raise ConfigurationError(
                    "the blob connection string is malformed (expected an Azure Storage "
                    "connection string with AccountName, AccountKey and BlobEndpoint)"
                ) from None
            self._blob[connection_string] = client
        return client

    def blob_checks(self, connection_string: str) -> ContainerChecks:
        """The preflight checks of the account's containers that passed, kept for a while."""
        return self._blob_checks.setdefault(connection_string, ContainerChecks())

    def kafka_producer(self, bootstrap: str, timeout_seconds: float) -> Producer:
        """The idempotent producer for a cluster's bootstrap servers; a message not delivered
        within `timeout_seconds` fails."""
        found = self._producers.get(bootstrap)
        if found is None:
            self._check_open()
            found = self._producers[bootstrap] = Producer(
                {
                    "bootstrap.servers": bootstrap,
                    "enable.idempotence": True,
                    "acks": "all",
                    # The Java client's partitioner: the tombstone must land on the partition
                    # that holds the key's earlier records, or it shadows nothing.
                    "partitioner": "murmur2_random",
                    "message.timeout.ms": int(timeout_seconds * 1000),
                }
            )
        return found

    def drop_kafka_producer(self, bootstrap: str) -> None:
        """Forget a producer that cannot recover (a fatal idempotence error): the next call
        makes a new one."""
        self._producers.pop(bootstrap, None)

    def kafka_admin(self, bootstrap: str) -> AdminClient:
        """The admin client for a cluster's bootstrap servers."""
        found = self._admins.get(bootstrap)
        if found is None:
            self._check_open()
            found = self._admins[bootstrap] = AdminClient({"bootstrap.servers": bootstrap})
        return found

    def kafka_readers(self, bootstrap: str) -> Readers:
        """The consumers that read a cluster's partitions, lent to one read at a time."""
        found = self._readers.get(bootstrap)
        if found is None:
            self._check_open()
            found = self._readers[bootstrap] = Readers(bootstrap)
        return found

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the worker's connector clients are closed")

    async def close(self) -> None:
        """Close every client: engines disposed, Redis and blob connections and idle Kafka
        readers closed. What a producer still holds is dropped: each step waits for its own
        deliveries, so only an undelivered tombstone is left, and its activity runs again."""
        self._closed = True
        engines, redis, blobs = (
            list(self._sql.values()),
            list(self._redis.values()),
            list(self._blob.values()),
        )
        producers = list(self._producers.values())
        readers = list(self._readers.values())
        self._sql.clear()
        self._schemas.clear()
        self._redis.clear()
        self._blob.clear()
        self._blob_checks.clear()
        self._producers.clear()
        self._admins.clear()
        self._readers.clear()
        for engine in engines:
            await engine.dispose()
        for client in redis:
            await client.aclose()
        for service in blobs:
            await service.close()
        for producer in producers:
            producer.purge()
            await asyncio.to_thread(producer.flush, 1.0)
        for kept in readers:
            await asyncio.to_thread(kept.close)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
