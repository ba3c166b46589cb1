"""Databases of a run's own on the stack's PostgreSQL, dropped when the run ends.

Lethe's store is append-only (the ledger), so a test module or a benchmark run that writes to
it gets a database of its own and drops it afterwards, whatever happened in between.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import create_async_engine


async def _administer(server: URL, statement: str) -> None:
    admin = create_async_engine(server.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(statement))
    finally:
        await admin.dispose()


@asynccontextmanager
async def postgres_database(server_url: str, name: str) -> AsyncIterator[str]:
    """Create database `name` on the server of `server_url`; its URL; drop it on the way out."""
    server = make_url(server_url)
    await _administer(server, f'CREATE DATABASE "{name}"')
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        await _administer(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@asynccontextmanager
async def store_database(shared_url: str, name: str) -> AsyncIterator[str]:
    """A Lethe store of the run's own beside the shared one: a PostgreSQL database on the same
    server, or a SQLite file when the shared store is not PostgreSQL; its URL."""
    if make_url(shared_url).get_backend_name().startswith("postgresql"):
        async with postgres_database(shared_url, name) as url:
            yield url
        return
    path = Path(tempfile.gettempdir()) / f"{name}.db"
    try:
        yield f"sqlite+aiosqlite:///{path}"
    finally:
        await asyncio.to_thread(path.unlink, True)
