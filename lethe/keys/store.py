"""The key store's tables and the statements on data keys (SQLAlchemy Core).

It lives in Lethe's store unless LETHE_KEYS_STORE_URL names a database of its own, which is
the better choice in production: a key store restored from a backup is then repaired by the
forget-list (kept in Lethe's store), which replays every shredding. The tables change only
through the revisions in `lethe/keys/migrations/` (a change here without one fails the tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    bindparam,
    delete,
    func,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from lethe.kernel import database
from lethe.kernel.migrations import Schema

key_tables = MetaData()

kek_versions = Table(
    "lethe_kek_versions",
    key_tables,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("material", LargeBinary),  # sealed by the master key; NULL once retired
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("retired_at", DateTime(timezone=True)),
    Column("rotation_id", String(100), unique=True),
)

kek_state = Table(
    "lethe_kek_state",
    key_tables,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("min_decrypt_version", Integer, nullable=False),
)

data_keys = Table(
    "lethe_data_keys",
    key_tables,
    Column("subject_ref", String(32), primary_key=True),
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("tenant", String(100), nullable=False),
    # No index on kek_version: the rewrap scan must walk the primary key in order (a planner
    # choosing this index instead sorts every remaining key for each batch).
    Column("kek_version", Integer, nullable=False),
    Column("wrapped", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # encryptions reserved under this version so far (in blocks, so an upper bound)
    Column("encryptions", BigInteger, nullable=False),
)

codec_keys = Table(
    "lethe_codec_keys",
    key_tables,
    Column("key_id", String(64), primary_key=True),
    Column("material", LargeBinary),  # sealed by the master key; NULL once retired
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("retired_at", DateTime(timezone=True)),
)

shredded = Table(
    "lethe_shredded_subjects",
    key_tables,
    Column("subject_ref", String(32), primary_key=True),
    Column("tenant", String(100), nullable=False),
    Column("shredded_at", DateTime(timezone=True), nullable=False),
    Column("request_id", String(100), nullable=False),
    Column("versions_destroyed", Integer, nullable=False),
)

schema = Schema(
    key="keys",
    name="the key store",
    tables=key_tables,
    versions=Path(__file__).resolve().parent / "migrations",
    version_table="lethe_keys_version",
    baseline="keys_0001",
)


async def key_engine(url: str) -> AsyncEngine:
    """The key store's engine, created once per process, its schema at its head."""
    return await database.engine_for(url, schema)


@dataclass(frozen=True, slots=True)
class DataKeyRow:
    """One wrapped data-key version as stored."""

    subject_ref: str
    version: int
    tenant: str
    kek_version: int
    wrapped: bytes
    encryptions: int


def _row(found: object) -> DataKeyRow:
    mapping = found._mapping  # type: ignore[attr-defined]
    return DataKeyRow(
        subject_ref=mapping["subject_ref"],
        version=mapping["version"],
        tenant=mapping["tenant"],
        kek_version=mapping["kek_version"],
        wrapped=bytes(mapping["wrapped"]),
        encryptions=mapping["encryptions"],
    )


async def latest_key(engine: AsyncEngine, subject_ref: str) -> DataKeyRow | None:
    """The subject's newest data-key version, if any."""
    query = (
        select(data_keys)
        .where(data_keys.c.subject_ref == subject_ref)
        .order_by(data_keys.c.version.desc())
        .limit(1)
    )
    async with engine.connect() as conn:
        found = (await conn.execute(query)).first()
    return None if found is None else _row(found)


async def key_version(engine: AsyncEngine, subject_ref: str, version: int) -> DataKeyRow | None:
    """One data-key version of a subject, if it exists."""
    query = select(data_keys).where(
        data_keys.c.subject_ref == subject_ref, data_keys.c.version == version
    )
    async with engine.connect() as conn:
        found = (await conn.execute(query)).first()
    return None if found is None else _row(found)


class _Refused(Exception):
    """Undo the key just inserted: the subject was shredded, or its KEK is too old."""

    def __init__(self, result: AddResult) -> None:
        super().__init__(result)
        self.result = result


async def _lock_subject(conn: AsyncConnection, subject_ref: str) -> None:
    """Serialise key creation and shredding for one subject until the transaction ends.

    PostgreSQL takes a transaction-scoped advisory lock; SQLite has a single writer, and both
    callers write before they read, so they are serialised already.
    """
    if conn.dialect.name == "postgresql":
        await conn.execute(
            select(func.pg_advisory_xact_lock(func.hashtextextended(subject_ref, 0)))
        )


AddResult = Literal["added", "exists", "shredded", "stale_kek"]


async def add_key(engine: AsyncEngine, row: DataKeyRow) -> AddResult:
    """Store a new data-key version, unless the subject was shredded, the version exists, or
    its KEK version is below the minimum decryption version (a stale view of the KEKs)."""
    values = {
        "subject_ref": row.subject_ref,
        "version": row.version,
        "tenant": row.tenant,
        "kek_version": row.kek_version,
        "wrapped": row.wrapped,
        "encryptions": row.encryptions,
        "created_at": datetime.now(UTC),
    }
    try:
        async with engine.begin() as conn:
            await _lock_subject(conn, row.subject_ref)
            await conn.execute(insert(data_keys).values(**values))
            marker = select(shredded.c.subject_ref).where(shredded.c.subject_ref == row.subject_ref)
            if (await conn.execute(marker)).first() is not None:
                raise _Refused("shredded")  # rolls the insert back
            minimum = await conn.execute(
                select(kek_state.c.min_decrypt_version).with_for_update(read=True)
            )
            if row.kek_version < (minimum.scalar_one_or_none() or 0):
                raise _Refused("stale_kek")
    except IntegrityError:
        return "exists"
    except _Refused as refused:
        return refused.result
    return "added"


async def reserve(engine: AsyncEngine, subject_ref: str, version: int, block: int) -> int | None:
    """Reserve `block` more encryptions under a version; the new total, None if it is gone."""
    async with engine.begin() as conn:
        result = await conn.execute(
            update(data_keys)
            .where(data_keys.c.subject_ref == subject_ref, data_keys.c.version == version)
            .values(encryptions=data_keys.c.encryptions + block)
            .returning(data_keys.c.encryptions)
        )
        total = result.scalar_one_or_none()
    return None if total is None else int(total)


async def shredding_of(engine: AsyncEngine, subject_ref: str) -> datetime | None:
    """When the subject's keys were shredded, or None if they never were."""
    query = select(shredded.c.shredded_at).where(shredded.c.subject_ref == subject_ref)
    async with engine.connect() as conn:
        return (await conn.execute(query)).scalar_one_or_none()


async def shred(engine: AsyncEngine, subject_ref: str, tenant: str, request_id: str) -> int:
    """Destroy every data-key version of the subject and mark it shredded; versions destroyed.

    Idempotent: a second call destroys what a restore brought back (0 when nothing did) and
    keeps the first shredding's record.
    """
    async with engine.begin() as conn:
        await _lock_subject(conn, subject_ref)
        result = await conn.execute(delete(data_keys).where(data_keys.c.subject_ref == subject_ref))
        destroyed = result.rowcount or 0
        known = await conn.execute(
            select(shredded.c.subject_ref).where(shredded.c.subject_ref == subject_ref)
        )
        if known.first() is None:
            await conn.execute(
                insert(shredded).values(
                    subject_ref=subject_ref,
                    tenant=tenant,
                    shredded_at=datetime.now(UTC),
                    request_id=request_id,
                    versions_destroyed=destroyed,
                )
            )
    return destroyed


async def keys_below(
    engine: AsyncEngine, kek_version: int, after: tuple[str, int] | None, limit: int
) -> list[DataKeyRow]:
    """Up to `limit` data keys wrapped by a KEK older than `kek_version`, in key order after
    `after` (keyset pagination, so a resumed scan neither repeats nor skips a key)."""
    query = select(data_keys).where(data_keys.c.kek_version < kek_version)
    if after is not None:
        # A row-value comparison, so the primary key's index starts the scan at the cursor.
        query = query.where(tuple_(data_keys.c.subject_ref, data_keys.c.version) > tuple_(*after))
    query = query.order_by(data_keys.c.subject_ref, data_keys.c.version).limit(limit)
    async with engine.connect() as conn:
        return [_row(found) for found in (await conn.execute(query)).all()]


async def rewrap(engine: AsyncEngine, rewrapped: Sequence[tuple[DataKeyRow, int, bytes]]) -> int:
    """Store new wrappings (row, new KEK version, wrapped) in one transaction; rows changed.

    Each update applies only while the row still has the wrapping it was read with, so a key
    shredded or rewrapped meanwhile is left alone rather than brought back or wrapped twice.
    """
    if not rewrapped:
        return 0
    statement = (
        update(data_keys)
        .where(
            data_keys.c.subject_ref == bindparam("ref"),
            data_keys.c.version == bindparam("ver"),
            data_keys.c.kek_version == bindparam("old_kek"),
        )
        .values(kek_version=bindparam("new_kek"), wrapped=bindparam("new_wrapped"))
    )
    params = [
        {
            "ref": row.subject_ref,
            "ver": row.version,
            "old_kek": row.kek_version,
            "new_kek": new_kek,
            "new_wrapped": wrapped,
        }
        for row, new_kek, wrapped in rewrapped
    ]
    async with engine.begin() as conn:
        result = await conn.execute(statement, params)
    return result.rowcount or 0


async def count_by_kek(engine: AsyncEngine) -> dict[int, int]:
    """How many data keys each KEK version wraps."""
    query = select(data_keys.c.kek_version, func.count()).group_by(data_keys.c.kek_version)
    async with engine.connect() as conn:
        return {version: count for version, count in (await conn.execute(query)).all()}


async def count_below(on: AsyncEngine | AsyncConnection, kek_version: int) -> int:
    """How many data keys a KEK older than `kek_version` still wraps (in `on`'s transaction,
    when it is a connection)."""
    query = select(func.count()).where(data_keys.c.kek_version < kek_version)
    if isinstance(on, AsyncConnection):
        return int((await on.execute(query)).scalar_one())
    async with on.connect() as conn:
        return int((await conn.execute(query)).scalar_one())


def key_order(row: DataKeyRow) -> tuple[str, int]:
    """A data key's place in scan order: the cursor a rewrap checkpoints."""
    return (row.subject_ref, row.version)


async def count_shredded(engine: AsyncEngine) -> int:
    """How many subjects' keys have been shredded."""
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(shredded))).scalar_one())
