"""The audit query's measurement: the API's role on the seeded store, an auditor token per
tenant, the query's paths, and its raw floor (the same SQL through psycopg, no API, no RLS).

The API reaches the store as a role without BYPASSRLS (`lethe db grant-api`), as a deployment
does, so PostgreSQL's row-level security is in what is measured. The floor runs the statement
`lethe.evidence.ledger.search` builds, compiled for psycopg, as the tables' owner.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import psycopg as psycopg_dialect
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from bench.api_parts.ledger_seed import ACTIONS, TENANTS
from bench.api_parts.load import Load, Paths
from bench.harness.cpu import CpuSample, spent
from lethe.evidence import api_role, store, tokens

ROLE = "lethe_bench_api"
QUERIED_ACTIONS = tuple(action for action in ACTIONS if action != "retention.batch")
"""The actions a tenant's entries have (a retention sweep's are of no tenant)."""
PAGE = 50


@dataclass(frozen=True)
class Window:
    """The year the audit query asks for: the middle one of the seeded three."""

    since: datetime
    until: datetime

    @classmethod
    def middle_year(cls, first_at: datetime) -> Window:
        """From one year after the first entry to two years after."""
        return cls(first_at + timedelta(days=365), first_at + timedelta(days=730))

    def query(self, tenant: str, action: str) -> str:
        """The API path of the query's first page."""
        since = self.since.strftime("%Y-%m-%dT%H:%M:%SZ")
        until = self.until.strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"/v1/ledger?tenant={tenant}&action={action}&since={since}&until={until}"


def paths(window: Window, tenant: str) -> Paths:
    """An auditor of `tenant`'s queries: a random action each time."""
    return lambda rng: window.query(tenant, rng.choice(QUERIED_ACTIONS))


def owner_dsn(url: str) -> str:
    """psycopg's connection string for a SQLAlchemy URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def api_role_url(owner_url: str) -> str:
    """The API's role (made if missing, a new password each run) granted on the seeded store;
    the store's URL as that role."""
    password = secrets.token_hex(16)
    admin = create_async_engine(owner_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            found = await conn.execute(
                text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": ROLE}
            )
            verb = "ALTER" if found.first() else "CREATE"
            await conn.execute(text(f"{verb} ROLE {ROLE} LOGIN PASSWORD '{password}' NOBYPASSRLS"))
            await api_role.grant_api(conn, ROLE)
    finally:
        await admin.dispose()
    return (
        make_url(owner_url)
        .set(username=ROLE, password=password)
        .render_as_string(hide_password=False)
    )


async def drop_role(server_url: str) -> None:
    """Drop the API's role (its grants went with the seeded database)."""
    admin = create_async_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f"DROP ROLE IF EXISTS {ROLE}"))
    finally:
        await admin.dispose()


async def auditor_tokens(owner_url: str) -> dict[str, str]:
    """An auditor token for each tenant; tenant -> its secret."""
    engine = await store.engine_for(owner_url)
    made = {}
    for tenant in TENANTS:
        _, made[tenant] = await tokens.create(
            engine,
            name=f"bench-auditor-{tenant}",
            role="auditor",
            tenant=tenant,
            lifetime=timedelta(hours=2),
            created_by="bench",
        )
    return made


def search_sql() -> tuple[str, list[str]]:
    """The statement `ledger.search` builds for a tenant, an action and a range, first page,
    compiled for psycopg; its text, and its parameters' names in the order given here."""
    ledger = store.ledger
    query = (
        select(ledger)
        .order_by(ledger.c.seq.desc())
        .limit(PAGE)
        .where(ledger.c.tenant == "t", ledger.c.action == "a")
        .where(ledger.c.at >= datetime.now(), ledger.c.at < datetime.now())
    )
    compiled = query.compile(dialect=psycopg_dialect.dialect())  # type: ignore[no-untyped-call]
    return str(compiled), list(compiled.params)


def floor_params(names: list[str], window: Window, rng: random.Random) -> dict[str, Any]:
    """One query's parameters: a random tenant and action, the window, the page."""
    values = [rng.choice(TENANTS), rng.choice(QUERIED_ACTIONS), window.since, window.until, PAGE]
    return dict(zip(names, values, strict=True))


async def explain(dsn: str, window: Window, tenant: str, action: str) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of the query, as the owner."""
    statement, names = search_sql()
    params = dict(zip(names, [tenant, action, window.since, window.until, PAGE], strict=True))
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        rows = await (
            await conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, params)
        ).fetchall()
    return "\n".join(row[0] for row in rows)


async def floor(
    dsn: str, window: Window, *, connections: int, seconds: float, warmup: float
) -> Load:
    """The query run directly, `connections` at once, each looping, for `warmup` + `seconds`:
    its latencies in the last `seconds` (each a round trip with the rows fetched)."""
    statement, names = search_sql()
    load = Load(seconds=seconds)
    conns = [
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) for _ in range(connections)
    ]
    begin = time.perf_counter()
    counted = (begin + warmup, begin + warmup + seconds)

    async def run(index: int, conn: psycopg.AsyncConnection[Any]) -> None:
        rng = random.Random(index)
        while time.perf_counter() < counted[1]:
            sent = time.perf_counter()
            rows = await (
                await conn.execute(statement, floor_params(names, window, rng))
            ).fetchall()
            done = time.perf_counter()
            if len(rows) != PAGE:
                load.failures[f"{len(rows)} rows"] += 1
            elif counted[0] <= sent and done <= counted[1]:
                load.latencies.append(done - sent)

    async def sample_cpu() -> None:
        await asyncio.sleep(warmup)
        before = CpuSample.take({})
        await asyncio.sleep(seconds)
        load.cpu = spent(before, CpuSample.take({}))

    try:
        await asyncio.gather(sample_cpu(), *(run(i, c) for i, c in enumerate(conns)))
    finally:
        for conn in conns:
            await conn.close()
    return load
