"""Lethe's own store: the ledger, legal holds, the forget-list and certificates (SQLAlchemy Core).

A SQLite file by default, PostgreSQL in production; tables are created on first use.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    event,
    insert,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from lethe.errors import ServiceUnavailable

metadata = MetaData()

ledger = Table(
    "lethe_ledger",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("request_id", String(100), nullable=False, index=True),
    Column("subject_ref", String(64), nullable=False, index=True),
    Column("actor", String(200), nullable=False),
    Column("action", String(100), nullable=False),
    Column("system", String(100)),
    Column("details", JSON, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Column("idempotency_key", String(300), nullable=False, unique=True),
)

ledger_head = Table(
    "lethe_ledger_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", Integer, nullable=False),
    Column("hash", String(64), nullable=False),
)

holds = Table(
    "lethe_holds",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("matter", String(200), nullable=False),
    Column("scope", String(20), nullable=False),
    Column("value", String(200), nullable=False),
    Column("reason", Text, nullable=False),
    Column("placed_by", String(200), nullable=False),
    Column("placed_at", DateTime(timezone=True), nullable=False),
    Column("released_by", String(200)),
    Column("released_at", DateTime(timezone=True)),
)

forget_list = Table(
    "lethe_forget_list",
    metadata,
    Column("subject_ref", String(64), primary_key=True),
    Column("tenant", String(100), nullable=False),
    Column("request_id", String(100), nullable=False),
    Column("systems", JSON, nullable=False),
    Column("erased_at", DateTime(timezone=True), nullable=False),
    Column("sealed_subject", Text, nullable=False),
)

certificates = Table(
    "lethe_certificates",
    metadata,
    Column("request_id", String(100), primary_key=True),
    Column("subject_ref", String(64), nullable=False, index=True),
    Column("issued_at", DateTime(timezone=True), nullable=False),
    Column("body", JSON, nullable=False),
)

GENESIS_HASH = "0" * 64

_engines: dict[str, AsyncEngine] = {}
_ready: set[tuple[str, int]] = set()
_lock = asyncio.Lock()


def _sqlite_pragmas(dbapi_connection: object, _: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


async def engine_for(url: str, tables: MetaData = metadata) -> AsyncEngine:
    """The store's engine for `url`, created once per process, with `tables` in place."""
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
                if tables is metadata:
                    async with engine.begin() as conn:
                        await _ensure_ledger_head(conn)
            except (SQLAlchemyError, OSError) as exc:
                shown = make_url(url).render_as_string(hide_password=True)
                raise ServiceUnavailable(
                    f"Lethe's store at {shown} is not reachable ({type(exc).__name__})"
                ) from None
            _ready.add((url, id(tables)))
    return engine


async def _ensure_ledger_head(conn: AsyncConnection) -> None:
    """The ledger's head row (seq 0, the genesis hash), which every append updates and locks."""
    found = (await conn.execute(select(ledger_head.c.id).where(ledger_head.c.id == 1))).first()
    if found is None:
        try:
            async with conn.begin_nested():
                await conn.execute(insert(ledger_head).values(id=1, seq=0, hash=GENESIS_HASH))
        except IntegrityError:
            pass  # another process made it first


async def dispose(engine: AsyncEngine) -> None:
    """Close one engine this module made, so the next `engine_for` makes it anew."""
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
