"""Databases Lethe owns (its store, the key store): one engine per URL and process.

A SQLite file by default, PostgreSQL in production. Engines are cached here and closed by
`dispose` or `dispose_all` (at a worker's shutdown, and between tests). On an engine's first
use each schema in it is brought to its head by its migrations, or refused when
LETHE_DB_MIGRATE=refuse and it is behind (`lethe.kernel.migrations`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from sqlalchemy import event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from lethe.kernel import migrations, tenancy
from lethe.kernel.config import current_settings
from lethe.kernel.errors import ServiceUnavailable

_engines: dict[str, AsyncEngine] = {}
_ready: set[tuple[str, int]] = set()
_lock = asyncio.Lock()


def _sqlite_pragmas(dbapi_connection: object, _: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


_SET_SCOPE = text("select set_config('lethe.tenant', :scope, true)")


def _scope_transaction(conn: Connection) -> None:
    """Begin a PostgreSQL transaction under the current tenant scope (`lethe.tenant`, which the
    store's row-level security checks), when one is set; with none, send nothing."""
    scope = tenancy.current()
    if scope is not None:
        conn.execute(_SET_SCOPE, {"scope": scope})


def new_engine(url: str) -> AsyncEngine:
    """An engine of its own for `url` (not cached): SQLite's folder made, its pragmas set."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url, pool_pre_ping=True)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    elif parsed.get_backend_name() == "postgresql":
        event.listen(engine.sync_engine, "begin", _scope_transaction)
    return engine


def unreachable(url: str, schema: migrations.Schema, exc: BaseException) -> ServiceUnavailable:
    """The error for a database that did not answer: the schema, the URL without its password."""
    shown = make_url(url).render_as_string(hide_password=True)
    return ServiceUnavailable(f"{schema.name} at {shown} is not reachable ({type(exc).__name__})")


async def engine_for(
    url: str,
    schema: migrations.Schema,
    prepare: Callable[[AsyncConnection], Awaitable[None]] | None = None,
) -> AsyncEngine:
    """The engine for `url`, created once per process, with `schema` at its head (upgraded, or
    refused by LETHE_DB_MIGRATE=refuse) and `prepare` run once on it in a transaction of its own."""
    async with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = new_engine(url)
        if (url, id(schema)) not in _ready:
            try:
                await migrations.ensure(engine, schema, current_settings().db_migrate)
                if prepare is not None:
                    async with engine.begin() as conn:
                        await prepare(conn)
            except (SQLAlchemyError, OSError) as exc:
                raise unreachable(url, schema, exc) from None
            _ready.add((url, id(schema)))
    return engine


async def schema_status(url: str, schema: migrations.Schema) -> migrations.SchemaStatus:
    """Where `schema` stands in the database at `url`, on an engine of its own; reads only (a
    SQLite file that does not exist is not made)."""
    parsed = make_url(url)
    file = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if file not in (None, "", ":memory:") and not await asyncio.to_thread(Path(str(file)).exists):
        return migrations.SchemaStatus(
            schema_key=schema.key,
            name=schema.name,
            revision=None,
            head=migrations.head(schema),
            state="empty",
        )
    engine = new_engine(url)
    try:
        return await migrations.status(engine, schema)
    except (SQLAlchemyError, OSError) as exc:
        raise unreachable(url, schema, exc) from None
    finally:
        await engine.dispose()


async def upgrade_schema(url: str, schema: migrations.Schema) -> migrations.Upgraded:
    """Bring `schema` in the database at `url` to its head, on an engine of its own, whatever
    LETHE_DB_MIGRATE says (this is the command that setting asks for)."""
    engine = new_engine(url)
    try:
        return await migrations.upgrade(engine, schema)
    except (SQLAlchemyError, OSError) as exc:
        raise unreachable(url, schema, exc) from None
    finally:
        await engine.dispose()


async def dispose(engine: AsyncEngine) -> None:
    """Close one engine made here, so the next `engine_for` makes it anew."""
    for url in [url for url, made in _engines.items() if made is engine]:
        del _engines[url]
        _ready.difference_update({ready for ready in _ready if ready[0] == url})
    await engine.dispose()


async def dispose_all() -> None:
    """Close every engine (at shutdown, and between tests)."""
    for engine in _engines.values():
        await engine.dispose()
    _engines.clear()
    _ready.clear()
