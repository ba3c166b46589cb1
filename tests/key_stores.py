"""Key stores of a test's own: a fresh PostgreSQL database on the stack, dropped afterwards.

The stack's `lethe_keys` database is shared with other tests and people (key rotation among
them), so tests that shred never touch it: each gets a database named for it alone.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from sqlalchemy import select
from sqlalchemy.engine import make_url

from lethe.kernel import probes
from lethe.keys import store as key_store
from lethe.keys.kek import LocalKekProvider
from lethe.keys.service import KeyService
from tests.conftest import require, stack_variable

KEYS_SYSTEM = """\
  - name: patient-keys
    kind: keys
    region: {region}
    connection: {variable}
    categories: [user.contact, user.health_and_medical]
"""
"""The key store as a system of a data map: `.format(region=..., variable=...)` names the region
and the variable holding its URL."""
EVENTS = ("kafka", "patient-events")
"""The system kind and name the end-to-end tests' services encrypt events under."""


@asynccontextmanager
async def fresh_key_store(label: str) -> AsyncIterator[str]:
    """The URL of a new, empty key-store database; dropped (connections and all) at the end."""
    shared = make_url(stack_variable("LETHE_KEYS_STORE_URL"))
    await require(probes.probe_sql(shared.render_as_string(hide_password=False)), "PostgreSQL")
    name = f"lethe_keys_{label}_{uuid.uuid4().hex[:8]}"
    admin = shared.set(drivername="postgresql", database="postgres").render_as_string(
        hide_password=False
    )
    url = shared.set(database=name).render_as_string(hide_password=False)
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
        await conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url
    finally:
        engine = await key_store.key_engine(url)
        await engine.dispose()
        async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def key_rows(keys: KeyService, ref: str) -> list[dict[str, Any]]:
    """The subject's rows of `lethe_data_keys`, as a backup of the key store holds them."""
    query = select(key_store.data_keys).where(key_store.data_keys.c.subject_ref == ref)
    async with keys.engine.connect() as conn:
        return [dict(row._mapping) for row in await conn.execute(query)]


async def key_service(url: str, master_key: bytes, subject_key: bytes) -> KeyService:
    """A key service on the key store at `url` with empty caches, as another process has it."""
    engine = await key_store.key_engine(url)
    provider = LocalKekProvider(engine, master_key, cache_seconds=0)
    return KeyService(engine, provider, subject_key, cache_seconds=0)
