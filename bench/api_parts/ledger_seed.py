"""A Lethe store of the benchmark's own with millions of ledger entries, seeded in SQL.

The entries are made by `INSERT ... SELECT FROM generate_series` in a few transactions, with the
secondary indexes dropped first and rebuilt after (as a bulk load is done), then ANALYZEd. They
look like real requests' entries (twelve a request: requested, started, approved, six steps done,
one pending compaction, erased, a certificate), five tenants, one request in 21 a retention
sweep of no tenant, spread evenly over three years up to the seeding's day. Their hashes are
random-looking and do NOT chain: the audit query never reads them, and no chain check is made.

The database keeps the seeding's facts in its comment, so a later run with `--keep` reuses it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from lethe.evidence import store

DATABASE = "lethe_bench_ledger_{entries}"
"""The seeded store's database, by its size (kept between runs with --keep)."""
TENANTS = tuple(f"tenant-{index}" for index in range(5))
ENTRY_ACTIONS = (
    "erasure.requested",
    "erasure.started",
    "erasure.approved",
    *("step.done",) * 6,
    "step.pending_compaction",
    "erasure.erased",
    "certificate.issued",
)
"""A request's entries in order; a retention sweep's twelve are `retention.batch`."""
ACTIONS = (*dict.fromkeys(ENTRY_ACTIONS), "retention.batch")
SPAN = timedelta(days=3 * 365)
CHUNK = 1_000_000
Say = Callable[[str], None]


@dataclass(frozen=True)
class Seeded:
    """What the seeded database holds, and how long it took to make."""

    url: str
    entries: int
    first_at: datetime
    last_at: datetime
    seconds: float
    reused: bool


def _admin_url(server_url: str, database: str = "postgres") -> str:
    """A psycopg connection string for `database` on the store's server."""
    return (
        make_url(server_url)
        .set(drivername="postgresql", database=database)
        .render_as_string(hide_password=False)
    )


def database(entries: int) -> str:
    """The name of the seeded store's database with `entries` entries."""
    return DATABASE.format(entries=entries)


def store_url(server_url: str, entries: int) -> str:
    """The seeded store's SQLAlchemy URL, as its owner."""
    return (
        make_url(server_url).set(database=database(entries)).render_as_string(hide_password=False)
    )


def _kept(server_url: str, entries: int) -> Seeded | None:
    """The kept database's facts, if it exists and holds `entries` entries."""
    with psycopg.connect(_admin_url(server_url), autocommit=True) as conn:
        row = conn.execute(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
            (database(entries),),
        ).fetchone()
    if row is None or not row[0]:
        return None
    facts = json.loads(row[0])
    if facts.get("entries") != entries:
        return None
    return Seeded(
        url=store_url(server_url, entries),
        entries=entries,
        first_at=datetime.fromisoformat(facts["first_at"]),
        last_at=datetime.fromisoformat(facts["last_at"]),
        seconds=float(facts["seconds"]),
        reused=True,
    )


def drop(server_url: str, entries: int) -> None:
    """Drop the seeded database of `entries` entries."""
    with psycopg.connect(_admin_url(server_url), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(database(entries))
            )
        )


INSERT = """
INSERT INTO lethe_ledger (seq, at, request_id, subject_ref, actor, action, system, details,
                          prev_hash, hash, idempotency_key, tenant)
SELECT g,
       %(first)s::timestamptz + (g - 1) * %(step)s::interval,
       'erasure-' || md5((g / 12)::text),
       md5((g / 12)::text) || md5('s' || (g / 12)::text),
       CASE WHEN (g / 12) %% 21 = 0 THEN 'retention' ELSE 'dpo@' || ((g / 12) %% 5) END,
       CASE WHEN (g / 12) %% 21 = 0 THEN 'retention.batch'
            ELSE (%(actions)s::text[])[1 + g %% 12] END,
       CASE WHEN g %% 12 BETWEEN 3 AND 9 THEN 'sql-' || (g %% 3) END,
       json_build_object('count', g %% 7, 'ms', g %% 997),
       md5((g - 1)::text) || md5('h' || (g - 1)::text),
       md5(g::text) || md5('h' || g::text),
       'bench/' || g,
       CASE WHEN (g / 12) %% 21 = 0 THEN NULL ELSE (%(tenants)s::text[])[1 + (g / 12) %% 5] END
FROM generate_series(%(low)s::bigint, %(high)s::bigint) AS g
"""


def _secondary_indexes(conn: psycopg.Connection) -> tuple[list[str], list[str]]:
    """The ledger's indexes other than its primary key: how to drop them, how to make them."""
    rows = conn.execute(
        """
        SELECT i.relname, pg_get_indexdef(i.oid), c.conname, pg_get_constraintdef(c.oid)
        FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
        LEFT JOIN pg_constraint c ON c.conindid = x.indexrelid
        WHERE x.indrelid = 'lethe_ledger'::regclass AND NOT x.indisprimary
        """
    ).fetchall()
    drops, makes = [], []
    for index, definition, constraint, constraint_definition in rows:
        if constraint is not None:
            drops.append(f'ALTER TABLE lethe_ledger DROP CONSTRAINT "{constraint}"')
            makes.append(
                f'ALTER TABLE lethe_ledger ADD CONSTRAINT "{constraint}" {constraint_definition}'
            )
        else:
            drops.append(f'DROP INDEX "{index}"')
            makes.append(definition)
    return drops, makes


def _fill(dsn: str, entries: int, first: datetime, step: timedelta, say: Say) -> None:
    """Insert the entries without the secondary indexes, rebuild them, move the ledger's head
    to the last entry, VACUUM ANALYZE."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '512MB'")
        drops, makes = _secondary_indexes(conn)
        for statement in drops:
            conn.execute(statement)
        for low in range(1, entries + 1, CHUNK):
            high = min(low + CHUNK - 1, entries)
            values = {
                "first": first,
                "step": step,
                "actions": list(ENTRY_ACTIONS),
                "tenants": list(TENANTS),
                "low": low,
                "high": high,
            }
            conn.execute(INSERT, values)
            say(f"  {high:,} entries")
        for statement in makes:
            say(f"  {statement[:90]}")
            conn.execute(statement)
        last = conn.execute("SELECT seq, hash FROM lethe_ledger ORDER BY seq DESC LIMIT 1")
        conn.execute(
            "UPDATE lethe_ledger_head SET seq = %s, hash = %s WHERE id = 1", last.fetchone()
        )
        conn.execute("VACUUM (ANALYZE) lethe_ledger")


async def seed(server_url: str, entries: int, say: Say, *, reuse: bool) -> Seeded:
    """The seeded store with `entries` ledger entries: the kept one when `reuse` and it holds as
    many, else made anew (its schema by Lethe's migrations, then the entries)."""
    if reuse and (kept := await asyncio.to_thread(_kept, server_url, entries)) is not None:
        return kept
    await asyncio.to_thread(drop, server_url, entries)
    name = sql.Identifier(database(entries))
    with psycopg.connect(_admin_url(server_url), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(name))
    url = store_url(server_url, entries)
    engine = await store.engine_for(url)  # the schema at its head, the ledger's head row
    await engine.dispose()
    started = time.monotonic()
    last_at = datetime.now(UTC).replace(microsecond=0)
    first_at = last_at - SPAN
    step = SPAN / max(entries - 1, 1)
    dsn = _admin_url(server_url, database(entries))
    await asyncio.to_thread(_fill, dsn, entries, first_at, step, say)
    seconds = time.monotonic() - started
    facts = {
        "entries": entries,
        "first_at": first_at.isoformat(),
        "last_at": last_at.isoformat(),
        "seconds": seconds,
    }
    with psycopg.connect(_admin_url(server_url), autocommit=True) as conn:
        conn.execute(
            sql.SQL("COMMENT ON DATABASE {} IS {}").format(name, sql.Literal(json.dumps(facts)))
        )
    return Seeded(url, entries, first_at, last_at, seconds, reused=False)
