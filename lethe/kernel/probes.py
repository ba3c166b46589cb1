"""Readiness probes for the services Lethe talks to: each answers, or raises ServiceUnavailable.

`python -m lethe.kernel.probes KIND TARGET` runs one from the shell (used by `scripts/stack`).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from azure.core.exceptions import AzureError
from azure.storage.blob.aio import BlobServiceClient
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import create_async_engine
from temporalio.client import Client as TemporalClient

from lethe.kernel.errors import ServiceUnavailable

TIMEOUT_SECONDS = 5.0


def _redacted_url(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"


def _blob_endpoint(connection_string: str) -> str:
    fields = dict(part.split("=", 1) for part in connection_string.split(";") if "=" in part)
    return fields.get("BlobEndpoint", f"account {fields.get('AccountName', '?')}")


async def probe_temporal(address: str, namespace: str = "default") -> str:
    """Temporal's frontend answers its health check (the server is SERVING)."""
    try:
        client = await TemporalClient.connect(address, namespace=namespace)
        healthy = await client.service_client.check_health(
            timeout=timedelta(seconds=TIMEOUT_SECONDS)
        )
    except RuntimeError as exc:
        raise ServiceUnavailable(f"Temporal at {address}: {exc}") from None
    if not healthy:
        raise ServiceUnavailable(f"Temporal at {address} is not SERVING")
    return f"Temporal at {address}: SERVING"


async def probe_sql(url: str) -> str:
    """The database accepts a connection and answers `SELECT 1`."""
    shown = make_url(url).render_as_string(hide_password=True)
    engine = create_async_engine(url, connect_args=_sql_connect_args(url))
    try:
        async with asyncio.timeout(TIMEOUT_SECONDS), engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            version = conn.dialect.server_version_info
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        raise ServiceUnavailable(f"database at {shown}: {type(exc).__name__}") from None
    finally:
        await engine.dispose()
    return f"database at {shown}: version {'.'.join(map(str, version or ()))}"


def _sql_connect_args(url: str) -> dict[str, object]:
    return {"connect_timeout": int(TIMEOUT_SECONDS)} if url.startswith("postgresql") else {}


async def probe_redis(url: str) -> str:
    """Redis answers PING."""
    client = Redis.from_url(url, socket_timeout=TIMEOUT_SECONDS)
    try:
        await client.ping()
        info = await client.info("server")
    except (RedisError, OSError) as exc:
        raise ServiceUnavailable(f"Redis at {_redacted_url(url)}: {exc}") from None
    finally:
        await client.aclose()
    return f"Redis at {_redacted_url(url)}: version {info.get('redis_version')}"


async def probe_kafka(bootstrap: str) -> str:
    """A Kafka broker answers a metadata request."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 5000})
    try:
        metadata = await asyncio.to_thread(admin.list_topics, timeout=TIMEOUT_SECONDS)
    except KafkaException as exc:
        raise ServiceUnavailable(f"Kafka at {bootstrap}: {exc.args[0]}") from None
    return f"Kafka at {bootstrap}: {len(metadata.brokers)} broker(s)"


async def probe_blob(connection_string: str) -> str:
    """The blob service answers a request for its properties."""
    endpoint = _blob_endpoint(connection_string)
    try:
        async with BlobServiceClient.from_connection_string(connection_string) as service:
            async with asyncio.timeout(TIMEOUT_SECONDS):
                await service.get_service_properties()
    except (AzureError, ValueError, TimeoutError) as exc:
        raise ServiceUnavailable(f"blob service at {endpoint}: {type(exc).__name__}") from None
    return f"blob service at {endpoint}: answering"


PROBES: dict[str, Callable[[str], Coroutine[Any, Any, str]]] = {
    "temporal": probe_temporal,
    "sql": probe_sql,
    "redis": probe_redis,
    "kafka": probe_kafka,
    "blob": probe_blob,
}


def main(argv: list[str]) -> int:
    """`python -m lethe.kernel.probes KIND TARGET`: print the answer; exit 1 if it is down."""
    if len(argv) != 2 or argv[0] not in PROBES:
        print(
            f"usage: python -m lethe.kernel.probes {{{','.join(PROBES)}}} TARGET", file=sys.stderr
        )
        return 2
    try:
        print(asyncio.run(PROBES[argv[0]](argv[1])))
    except ServiceUnavailable as exc:
        print(f"not ready: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
