"""The swept table: `portal_sessions`, half its rows past 90 days since their last activity,
seeded by one INSERT ... SELECT over generate_series, and the check of what a sweep left.

The data is the same on every seeding: row `id` is expired when `id` is even, last seen 91 to 180
days before the seeding, else 0 to 89 days before; the dates are spread by a multiplicative hash
of the id, so expired and kept rows share every heap page and the sweep's order (by date) jumps
about the table as a real one would. The day's gap around the 90-day cutoff keeps the expired
set the same whenever the sweep judges, a few minutes after the seeding.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    MetaData,
    Table,
    Text,
    case,
    func,
    select,
    text,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from bench import BenchError

TABLE = "portal_sessions"
LIMIT = timedelta(days=90)
"""The pack's storage limit for `user.device`, from the last activity."""
SPREAD_SECONDS = 89 * 86_400
"""Each half's dates spread over 89 days: kept 0-89 days old, expired 91-180."""
PATIENTS = 100_000

sessions = Table(
    TABLE,
    MetaData(),
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("patient_id", Text, nullable=False),
    Column("ip_address", Text, nullable=False),
    Column("last_seen_at", DateTime(timezone=True), nullable=False),
)

_SEED = text(
    f"""
    INSERT INTO {TABLE} (id, patient_id, ip_address, last_seen_at)
    SELECT i,
           'p-' || lpad((i % {PATIENTS})::text, 6, '0'),
           '198.51.100.' || (i % 250 + 1),
           CAST(:seeded AS timestamptz)
             - make_interval(days => CASE WHEN i % 2 = 0 THEN 91 ELSE 0 END)
             - make_interval(secs => (i * 7919) % {SPREAD_SECONDS})
    FROM generate_series(1::bigint, CAST(:rows AS bigint)) AS i
    """
)


def expired_count(rows: int) -> int:
    """How many of `rows` seeded rows are past the limit: the even ids."""
    return rows // 2


async def seed(engine: AsyncEngine, rows: int, seeded: datetime) -> None:
    """(Re)create the table with `rows` rows dated from `seeded`, its primary key and the
    (last_seen_at, id) index the sweep walks, vacuumed, analysed and checkpointed."""
    async with engine.begin() as conn:
        await conn.execute(text(f"DROP TABLE IF EXISTS {TABLE}"))
        await conn.execute(
            text(
                f"CREATE TABLE {TABLE} (id bigint NOT NULL, patient_id text NOT NULL, "
                "ip_address text NOT NULL, last_seen_at timestamptz NOT NULL)"
            )
        )
        await conn.execute(_SEED, {"seeded": seeded, "rows": rows})
        await conn.execute(text(f"ALTER TABLE {TABLE} ADD PRIMARY KEY (id)"))
        await conn.execute(text(f"CREATE INDEX {TABLE}_last_seen ON {TABLE} (last_seen_at, id)"))
    async with engine.connect() as conn:
        autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await autocommit.execute(text(f"VACUUM (ANALYZE) {TABLE}"))
        # The seeding's dirty pages are written now, not during the measurement.
        await autocommit.execute(text("CHECKPOINT"))


async def drop(engine: AsyncEngine) -> None:
    """Drop the table."""
    async with engine.begin() as conn:
        await conn.execute(text(f"DROP TABLE IF EXISTS {TABLE}"))


async def check_left(engine: AsyncEngine, rows: int, cutoff: datetime, side: str) -> None:
    """BenchError unless exactly the expired rows are gone: none dated before `cutoff` is left,
    and as many rows are left as were kept. The table only lost rows, so together these say the
    kept rows are all there."""
    table = sessions
    query = select(
        func.count(),
        func.coalesce(func.sum(case((table.c.last_seen_at < cutoff, 1), else_=0)), 0),
        func.coalesce(func.sum(table.c.id % 2), 0),
    )
    async with engine.connect() as conn:
        left, expired_left, odd = (await conn.execute(query)).one()
    kept = rows - expired_count(rows)
    if expired_left or left != kept or odd != kept:
        raise BenchError(
            f"{side}: {left} rows left ({kept} expected), {expired_left} of them past the limit, "
            f"{odd} with odd ids ({kept} expected)"
        )


async def check_seeded(engine: AsyncEngine, rows: int, cutoff: datetime) -> None:
    """BenchError unless the table holds `rows` rows, exactly the even ids past `cutoff`."""
    table = sessions
    expired = table.c.last_seen_at < cutoff
    query = select(
        func.count(),
        func.coalesce(func.sum(case((expired, 1), else_=0)), 0),
        func.coalesce(func.sum(case((expired & (table.c.id % 2 == 0), 1), else_=0)), 0),
    )
    async with engine.connect() as conn:
        count, due, even_due = (await conn.execute(query)).one()
    wanted = expired_count(rows)
    if count != rows or due != wanted or even_due != wanted:
        raise BenchError(
            f"seeding: {count} rows ({rows} wanted), {due} past the limit ({wanted} wanted), "
            f"{even_due} of them with even ids"
        )
