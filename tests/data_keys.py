"""Data keys made fast for rotation tests, and a log of every rewrap the key store commits.

`seed_data_keys` wraps fresh keys with the key service's own provider, exactly as a first
encryption does, but inserts them in bulk: tens of thousands in seconds. `log_rewraps` adds a
trigger that records each change of a key's KEK version in the transaction that makes it, so
a test sees which keys were rewrapped, and how many times, without mocking anything.
"""

from __future__ import annotations

import os
from collections import Counter
from datetime import UTC, datetime

from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncEngine

from lethe.keys import store as key_store
from lethe.keys.service import DEK_BYTES, KeyService, dek_aad

TENANT = "clinic"
CHUNK = 5000

_TRIGGERS = {
    "sqlite": [
        "CREATE TABLE rewrap_log (subject_ref TEXT, version INT, old INT, new INT)",
        """
        CREATE TRIGGER log_rewrap AFTER UPDATE OF kek_version ON lethe_data_keys
        WHEN OLD.kek_version != NEW.kek_version
        BEGIN
          INSERT INTO rewrap_log
          VALUES (OLD.subject_ref, OLD.version, OLD.kek_version, NEW.kek_version);
        END
        """,
    ],
    "postgresql": [
        "CREATE TABLE rewrap_log (subject_ref TEXT, version INT, old INT, new INT)",
        """
        CREATE FUNCTION log_rewrap() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          INSERT INTO rewrap_log
          VALUES (OLD.subject_ref, OLD.version, OLD.kek_version, NEW.kek_version);
          RETURN NEW;
        END $$
        """,
        """
        CREATE TRIGGER log_rewrap AFTER UPDATE OF kek_version ON lethe_data_keys
        FOR EACH ROW WHEN (OLD.kek_version IS DISTINCT FROM NEW.kek_version)
        EXECUTE FUNCTION log_rewrap()
        """,
    ],
}


def subject_id(n: int) -> str:
    """The made-up subject id of seeded subject `n`."""
    return f"p{n:06d}"


async def seed_data_keys(keys: KeyService, count: int, *, first: int = 0) -> int:
    """Give subjects `first` .. `first + count - 1` a data key (version 1) wrapped by the
    current KEK version, as their first encryption would; that KEK version."""
    kek = await keys.provider.current_version()
    now = datetime.now(UTC)
    rows = []
    for n in range(first, first + count):
        ref = keys.subject_ref(TENANT, subject_id(n))
        wrapped = await keys.provider.wrap(kek, os.urandom(DEK_BYTES), dek_aad(ref, 1))
        rows.append(
            {
                "subject_ref": ref,
                "version": 1,
                "tenant": TENANT,
                "kek_version": kek,
                "wrapped": wrapped,
                "created_at": now,
                "encryptions": 0,
            }
        )
    for start in range(0, len(rows), CHUNK):
        async with keys.engine.begin() as conn:
            await conn.execute(insert(key_store.data_keys), rows[start : start + CHUNK])
    return kek


async def log_rewraps(engine: AsyncEngine) -> None:
    """Record every committed change of a data key's KEK version in `rewrap_log`."""
    async with engine.begin() as conn:
        for statement in _TRIGGERS[engine.dialect.name]:
            await conn.execute(text(statement))


async def rewraps(engine: AsyncEngine) -> Counter[tuple[str, int, int, int]]:
    """How often each (subject reference, version, old KEK, new KEK) change was committed."""
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT * FROM rewrap_log"))).all()
    return Counter((row[0], row[1], row[2], row[3]) for row in rows)
