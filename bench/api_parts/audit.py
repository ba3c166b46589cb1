"""The audit query's measurement: the API's role on the seeded store, an auditor token per
tenant, the query's paths, and its raw floor (the same SQL through psycopg, no API, no RLS).

The API reaches the store as a role without BYPASSRLS (`lethe db grant-api`), as a deployment
does, so PostgreSQL's row-level security is in what is measured. The floor runs the statement
`lethe.evidence.ledger.search` sends (caught on its way to psycopg) directly through psycopg, as
the tables' owner; and, while `search` orders by sequence alone, the same statement ordered by
time then sequence, which the (tenant, action, at) index serves.
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
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from bench import BenchError
from bench.api_parts.ledger_seed import ACTIONS, TENANTS
from bench.api_parts.load import Load, Paths
from bench.harness.cpu import CpuSample, spent
from lethe.evidence import api_role, ledger, store, tokens

ROLE = "lethe_bench_api_{entries}"
"""The API's role, one per seeded store (kept with it)."""
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


async def api_role_url(owner_url: str, entries: int) -> str:
    """The API's role (made if missing, a new password each run) granted on the seeded store;
    the store's URL as that role."""
    role = ROLE.format(entries=entries)
    password = secrets.token_hex(16)
    admin = create_async_engine(owner_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            found = await conn.execute(
                text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}
            )
            verb = "ALTER" if found.first() else "CREATE"
            await conn.execute(text(f"{verb} ROLE {role} LOGIN PASSWORD '{password}' NOBYPASSRLS"))
            await api_role.grant_api(conn, role)
    finally:
        await admin.dispose()
    return (
        make_url(owner_url)
        .set(username=role, password=password)
        .render_as_string(hide_password=False)
    )


async def drop_role(server_url: str, entries: int) -> None:
    """Drop the API's role, once its seeded database (and so its grants) is gone."""
    admin = create_async_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f"DROP ROLE IF EXISTS {ROLE.format(entries=entries)}"))
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


@dataclass(frozen=True)
class Statement:
    """A statement as `ledger.search` sends it through psycopg, with its parameters' names."""

    text: str
    names: dict[str, str]
    """Parameter name -> what it stands for: tenant, action, since, until or limit."""

    def params(self, tenant: str, action: str, window: Window) -> dict[str, Any]:
        """The parameters for one query of the first page."""
        values = {
            "tenant": tenant,
            "action": action,
            "since": window.since,
            "until": window.until,
            "limit": PAGE,
        }
        return {name: values[meaning] for name, meaning in self.names.items()}


async def search_statement(owner_url: str, window: Window) -> Statement:
    """The statement `ledger.search` sends for a tenant, an action and a range, first page:
    caught on its way to psycopg (so the floor runs whatever `search` builds today)."""
    engine = create_async_engine(owner_url)
    caught: list[tuple[str, dict[str, Any]]] = []

    def catch(_c: object, _r: object, statement: str, params: Any, *_: object) -> None:
        caught.append((statement, dict(params)))

    event.listen(engine.sync_engine, "before_cursor_execute", catch)
    tenant, action = "tenant-x", "action-x"
    marks = {"tenant": tenant, "action": action, "since": window.since}
    marks |= {"until": window.until, "limit": PAGE}
    try:
        await ledger.search(
            engine,
            tenant=tenant,
            action=action,
            since=window.since,
            until=window.until,
            limit=PAGE,
        )
    finally:
        await engine.dispose()
    for statement, params in caught:
        if "lethe_ledger" in statement and "ORDER BY" in statement:
            names = {n: m for n, v in params.items() for m, mark in marks.items() if v == mark}
            return Statement(statement, names)
    raise BenchError("ledger.search sent no statement over the ledger")


async def explain(dsn: str, statement: Statement, window: Window, tenant: str, action: str) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of the statement, as the owner."""
    params = statement.params(tenant, action, window)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        explained = "EXPLAIN (ANALYZE, BUFFERS) " + statement.text
        rows = await (await conn.execute(explained, params)).fetchall()
    return "\n".join(row[0] for row in rows)


async def floor(
    dsn: str,
    statement: Statement,
    window: Window,
    *,
    connections: int,
    seconds: float,
    warmup: float,
    pids: dict[str, int],
    trees: dict[str, int],
) -> Load:
    """The statement run directly, `connections` at once, each looping (a random tenant and
    action each time), for `warmup` + `seconds`: the latencies of those sent in the last
    `seconds` (each a round trip, rows fetched), and the CPU `pids` and `trees` used."""
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
            params = statement.params(rng.choice(TENANTS), rng.choice(QUERIED_ACTIONS), window)
            query = await conn.execute(statement.text, params)
            rows = await query.fetchall()
            done = time.perf_counter()
            if len(rows) != PAGE:
                load.failures[f"{len(rows)} rows"] += 1
            elif counted[0] <= sent < counted[1]:
                load.latencies.append(done - sent)

    async def sample_cpu() -> None:
        await asyncio.sleep(warmup)
        before = CpuSample.take(pids, trees)
        await asyncio.sleep(seconds)
        load.cpu = spent(before, CpuSample.take(pids, trees))

    try:
        await asyncio.gather(sample_cpu(), *(run(i, c) for i, c in enumerate(conns)))
    finally:
        for conn in conns:
            await conn.close()
    return load
