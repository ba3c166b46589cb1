"""Databases Lethe owns (its store, the key store): one engine per URL and process.

A SQLite file by default, PostgreSQL in production. Engines are cached here and closed by
`dispose` or `dispose_all` (at a worker's shutdown, and between tests).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from sqlalchemy import MetaData, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from lethe.kernel.errors import ServiceUnavailable

_engines: dict[str, AsyncEngine] = {}
_ready: set[tuple[str, int]] = set()
_lock = asyncio.Lock()


def _sqlite_pragmas(dbapi_connection: object, _: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


async def engine_for(
    url: str,
    tables: MetaData,
    prepare: Callable[[AsyncConnection], Awaitable[None]] | None = None,
) -> AsyncEngine:
    """The engine for `url`, created once per process, with `tables` in place and `prepare`
    run once on it (in a transaction of its own) after the tables are made."""
    async with _lock:
        engine = _engines.get(url)
        if engine is None:
            parsed = make_url(url)
            if parsed.get_backend_name() == "sqlite" and parsed.database:
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            engine = create_async_engine(url, pool_pre_ping=True)
            if parsed.get_backend_name() == "sqlite":
                event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
            _engines[url] = engine
        if (url, id(tables)) not in _ready:
            try:
                async with engine.begin() as conn:
                    await conn.run_sync(tables.create_all)
                if prepare is not None:
                    async with engine.begin() as conn:
                        await prepare(conn)
            except (SQLAlchemyError, OSError) as exc:
                shown = make_url(url).render_as_string(hide_password=True)
                raise ServiceUnavailable(
                    f"Lethe's store at {shown} is not reachable ({type(exc).__name__})"
                ) from None
            _ready.add((url, id(tables)))
    return engine


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
