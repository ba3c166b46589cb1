"""Tenant isolation in Lethe's store, on the stack's PostgreSQL (row-level security, as the API's
role sees it) and on SQLite (the application layer).

Two tenants' ledger entries, holds, certificates and forget-list entries, and entries of no
tenant; under st-mary's scope only st-mary's rows show, with no scope set the API's role sees
none, and a write for another tenant is refused.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, event, insert, text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from lethe.contracts import Contract, HoldScope, SweepReport
from lethe.evidence import api_role, certificates, forget_list, holds, ledger, store, sweep_reports
from lethe.evidence.store import OutOfScope
from lethe.kernel import database, migrations, tenancy
from tests.e2e.conftest import run_lethe

MARY, LUKE = "st-mary", "st-luke"
ON_POSTGRESQL = pytest.mark.parametrize("url", ["postgresql"], indirect=True)
"""Roles and row-level security are PostgreSQL's."""
TENANT_TABLES = [table.name for table in store.TENANT_TABLES]
OLD = migrations.baseline_tables(store.schema).tables  # certificates and holds as at store_0003


class Body(Contract):
    """A certificate's body, as far as the store reads it."""

    request_id: str
    tenant: str


@dataclass
class Seeded:
    """What was seeded: each tenant's request ids and holds."""

    requests: dict[str, str]
    hold_ids: dict[str | None, str]


async def _new_database(sql_url: str) -> tuple[str, AsyncEngine]:
    name = f"tenancy_{uuid.uuid4().hex[:10]}"
    admin = create_async_engine(sql_url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    return sql_url.rsplit("/", 1)[0] + f"/{name}", admin


@pytest.fixture(params=["postgresql", "sqlite"])
async def url(request: pytest.FixtureRequest, sql_url: str, tmp_path: Path) -> AsyncIterator[str]:
    """A new store database: on the stack's PostgreSQL, or a SQLite file."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'lethe.db'}"
        await database.dispose_all()
        return
    made, admin = await _new_database(sql_url)
    try:
        yield made
    finally:
        await database.dispose_all()
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE "{made.rsplit("/", 1)[1]}" WITH (FORCE)'))
        await admin.dispose()


@pytest.fixture
async def api_url(url: str, sql_url: str) -> AsyncIterator[str]:
    """The store's URL as a role without BYPASSRLS, granted by `lethe db grant-api` (PostgreSQL)."""
    role, password = f"lethe_api_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin = create_async_engine(sql_url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD '{password}' NOBYPASSRLS"))
    try:
        await store.engine_for(url)  # the schema at its head
        granted = await run_lethe({**os.environ, "LETHE_STORE_URL": url}, "db", "grant-api", role)
        assert granted.code == 0, granted
        assert f"GRANT INSERT ON lethe_ledger TO {role}" in granted.stdout
        host = url.split("@", 1)[1]
        yield f"postgresql+psycopg://{role}:{password}@{host}"
    finally:
        await database.dispose_all()
        owner = create_async_engine(url, isolation_level="AUTOCOMMIT")
        async with owner.connect() as conn:  # its grants in the store's database
            await conn.execute(text(f"DROP OWNED BY {role}"))
        await owner.dispose()
        async with admin.connect() as conn:
            await conn.execute(text(f"DROP ROLE {role}"))
        await admin.dispose()


async def _seed(engine: AsyncEngine) -> Seeded:
    """Two tenants' rows in every tenant table, and rows of no tenant (as the workers write)."""
    requests = {MARY: "req-mary", LUKE: "req-luke"}
    for tenant, request_id in requests.items():
        for action in ("erasure.requested", "erasure.completed"):
            await ledger.append(
                engine,
                idempotency_key=f"{request_id}/{action}",
                request_id=request_id,
                subject_ref="ab" * 16,
                actor="dpo",
                action=action,
                details={"steps": 2},
                tenant=tenant,
            )
        await certificates.keep(
            engine, request_id, "ab" * 16, Body(request_id=request_id, tenant=tenant)
        )
        await forget_list.add_sealed(
            engine,
            [(f"{tenant[3]}" * 32, "sealed")],
            tenant=tenant,
            request_id=request_id,
            systems=["db"],
        )
    await ledger.append(
        engine,
        idempotency_key="rotation/1",
        request_id="rotation",
        subject_ref="-",
        actor="lethe",
        action="keys.rotated",
    )
    now = datetime.now(UTC)
    await sweep_reports.keep(
        engine,
        SweepReport(
            run_id="sweep-1",
            requested_by="lethe",
            dry_run=True,
            apply=False,
            pack="gdpr",
            started_at=now,
            as_of=now,
            tasks=[],
        ),
    )
    hold_ids: dict[str | None, str] = {}
    placed: list[tuple[str | None, HoldScope, str]] = [
        (MARY, "tenant", MARY),
        (LUKE, "system", "db"),
        (None, "category", "health"),
    ]
    for held_for, scope, value in placed:
        hold = await holds.place(
            engine,
            matter="case",
            scope=scope,
            value=value,
            placed_by="counsel",
            reason="court",
            tenant=held_for,
        )
        hold_ids[held_for] = hold.id
    return Seeded(requests=requests, hold_ids=hold_ids)


async def _tenants(conn: AsyncConnection, table: str) -> set[str | None]:
    """The tenants of the rows of `table` this connection sees."""
    return {row.tenant for row in await conn.execute(text(f"SELECT tenant FROM {table}"))}


async def _as(conn: AsyncConnection, scope: str) -> None:
    """Set the transaction's scope, as the API's engine does."""
    await conn.execute(text("SELECT set_config('lethe.tenant', :scope, true)"), {"scope": scope})


@ON_POSTGRESQL
async def test_row_level_security_keeps_the_api_role_to_its_tenant(url: str, api_url: str) -> None:
    owner = await store.engine_for(url)
    await _seed(owner)
    api = create_async_engine(api_url)  # no listener: the settings are this test's own
    try:
        async with api.begin() as conn:
            await _as(conn, MARY)
            for table in TENANT_TABLES:
                expected = set() if table == "lethe_sweep_reports" else {MARY}
                assert await _tenants(conn, table) == expected, table
        async with api.begin() as conn:  # no scope set: no row at all (fail closed)
            for table in TENANT_TABLES:
                assert await _tenants(conn, table) == set(), table
        async with api.begin() as conn:
            await _as(conn, tenancy.ALL)
            assert await _tenants(conn, "lethe_ledger") == {MARY, LUKE, None}
            assert await _tenants(conn, "lethe_holds") == {MARY, LUKE, None}
            assert await _tenants(conn, "lethe_sweep_reports") == {None}

        for tenant in (LUKE, None):  # another tenant's row, or one of no tenant
            with pytest.raises(ProgrammingError, match="row-level security policy"):
                async with api.begin() as conn:
                    await _as(conn, MARY)
                    await conn.execute(
                        insert(store.holds).values(
                            id="hold-forged",
                            matter="m",
                            scope="system",
                            value="db",
                            reason="r",
                            placed_by="x",
                            placed_at=datetime.now(UTC),
                            tenant=tenant,
                        )
                    )
        with pytest.raises(ProgrammingError, match="permission denied"):
            async with api.begin() as conn:  # the ledger is appended to, never rewritten
                await _as(conn, tenancy.ALL)
                await conn.execute(text("UPDATE lethe_ledger SET actor = 'someone else'"))
        with pytest.raises(ProgrammingError, match="permission denied"):
            async with api.begin() as conn:
                await _as(conn, tenancy.ALL)
                await conn.execute(text("DELETE FROM lethe_forget_list"))
    finally:
        await api.dispose()
    # The owner (the workers' role) is not held by the policy: it sees every row, unscoped.
    async with owner.connect() as conn:
        assert await _tenants(conn, "lethe_ledger") == {MARY, LUKE, None}
        assert await _tenants(conn, "lethe_holds") == {MARY, LUKE, None}


async def _assert_scoped(engine: AsyncEngine, seeded: Seeded) -> None:
    """Under st-mary's scope the evidence reads show st-mary's rows only; under ALL, all."""
    with tenancy.scoped(MARY):
        found = await ledger.search(engine)
        assert {e.tenant for e in found} == {MARY} and len(found) == 3  # two entries, a hold
        assert await ledger.entries(engine, seeded.requests[LUKE]) == []
        assert [h.id for h in await holds.list_holds(engine)] == [seeded.hold_ids[MARY]]
        assert await certificates.read(engine, seeded.requests[LUKE]) is None
        mine = await certificates.read(engine, seeded.requests[MARY])
        assert mine is not None and mine["tenant"] == MARY
        assert [c["tenant"] for c in await certificates.recent(engine)] == [MARY]
        assert {e.tenant for e in await forget_list.entries(engine)} == {MARY}
        assert await forget_list.listed_among(engine, ["m" * 32, "l" * 32]) == {"m" * 32}
        assert await sweep_reports.recent(engine) == []
        with pytest.raises(sweep_reports.UnknownSweep):
            await sweep_reports.read(engine, "sweep-1")
        with pytest.raises(holds.UnknownHold):
            await holds.release(engine, seeded.hold_ids[LUKE], released_by="dpo")
    with tenancy.scoped(tenancy.ALL):
        assert len(await ledger.search(engine, limit=100)) == 8
        assert {h.tenant for h in await holds.list_holds(engine)} == {MARY, LUKE, None}
        assert len(await certificates.recent(engine)) == 2
        assert [r.run_id for r in await sweep_reports.recent(engine)] == ["sweep-1"]
        assert (await ledger.verify_chain(engine)).intact


async def _assert_scoped_writes(engine: AsyncEngine) -> None:
    """Under st-mary's scope a hold is st-mary's; one for another tenant is refused."""
    with tenancy.scoped(MARY):
        hold = await holds.place(
            engine, matter="m", scope="system", value="db", placed_by="dpo", reason="r"
        )
        assert hold.tenant == MARY
        placed = await ledger.search(engine, request_id=hold.id)
        assert [(e.action, e.tenant) for e in placed] == [("hold.placed", MARY)]
        released = await holds.release(engine, hold.id, released_by="dpo")
        assert released.tenant == MARY
        refused: list[tuple[str | None, HoldScope]] = [(LUKE, "system"), (None, "tenant")]
        for tenant, scope in refused:
            with pytest.raises(OutOfScope):
                await holds.place(
                    engine,
                    matter="m",
                    scope=scope,
                    value=tenant or LUKE,
                    placed_by="dpo",
                    reason="r",
                    tenant=tenant,
                )
        with pytest.raises(OutOfScope):
            await ledger.append(
                engine,
                idempotency_key="k",
                request_id="r",
                subject_ref="-",
                actor="a",
                action="x",
                tenant=None,
            )


async def test_the_application_keeps_each_scope_to_its_rows(url: str) -> None:
    """The evidence functions' own filter: the same on SQLite as on PostgreSQL's owner role
    (which row-level security does not hold)."""
    engine = await store.engine_for(url)
    seeded = await _seed(engine)
    await _assert_scoped(engine, seeded)
    await _assert_scoped_writes(engine)
    assert (await ledger.verify_chain(engine)).intact


@ON_POSTGRESQL
async def test_the_api_role_under_a_scope_sees_its_tenant_through_the_evidence_functions(
    url: str, api_url: str
) -> None:
    seeded = await _seed(await store.engine_for(url))
    # The API's engine, as it makes it: the schema's state checked as the API's role, and the
    # listener setting lethe.tenant per transaction.
    api = await store.engine_for(api_url)
    try:
        with tenancy.scoped(MARY):
            # Raw SQL, no filter of the application: the scope reached the transaction (the
            # context variable is seen inside SQLAlchemy's greenlet).
            async with api.connect() as conn:
                assert await _tenants(conn, "lethe_ledger") == {MARY}
                assert await conn.scalar(text("SELECT current_setting('lethe.tenant')")) == MARY
        async with api.connect() as conn:  # no scope: nothing sent, no row
            assert await _tenants(conn, "lethe_ledger") == set()
        assert await ledger.entries(api) == []
        await _assert_scoped(api, seeded)
        await _assert_scoped_writes(api)
        with tenancy.scoped(tenancy.ALL):
            assert (await ledger.verify_chain(api)).intact
    finally:
        await database.dispose(api)


async def test_an_api_role_is_refused_on_sqlite(tmp_path: Path) -> None:
    lite = f"sqlite+aiosqlite:///{tmp_path / 'lethe.db'}"
    refused = await run_lethe({**os.environ, "LETHE_STORE_URL": lite}, "db", "grant-api", "x")
    assert refused.code == 2, refused
    assert "an API role is for PostgreSQL, and Lethe's store is on sqlite" in refused.stderr
    assert not (tmp_path / "lethe.db").exists()


@ON_POSTGRESQL
async def test_a_role_that_would_bypass_row_level_security_is_refused(
    url: str, sql_url: str
) -> None:
    engine = await store.engine_for(url)
    role = f"lethe_bypass_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(sql_url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f"CREATE ROLE {role} BYPASSRLS"))
    try:
        async with engine.begin() as conn:
            with pytest.raises(api_role.RoleRefused, match="BYPASSRLS"):
                await api_role.grant_api(conn, role)
            with pytest.raises(api_role.RoleRefused, match="no role 'nobody_here'"):
                await api_role.grant_api(conn, "nobody_here")
            with pytest.raises(api_role.RoleRefused, match="a superuser"):
                await api_role.grant_api(conn, "postgres")
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f"DROP ROLE {role}"))
        await admin.dispose()


def _to_0003(connection: Connection) -> None:
    from alembic import command

    command.upgrade(migrations._config(store.schema, connection), "store_0003")


async def test_the_migration_fills_the_tenant_where_it_is_known(url: str) -> None:
    engine = database.new_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_to_0003)
            placed = datetime.now(UTC) - timedelta(days=1)
            await conn.execute(
                insert(OLD["lethe_certificates"]).values(
                    request_id="req-1",
                    subject_ref="ab" * 16,
                    issued_at=placed,
                    body={"tenant": MARY, "request_id": "req-1"},
                )
            )
            for hold_id, scope, value in (("h-1", "tenant", MARY), ("h-2", "system", "db")):
                await conn.execute(
                    insert(OLD["lethe_holds"]).values(
                        id=hold_id,
                        matter="m",
                        scope=scope,
                        value=value,
                        reason="r",
                        placed_by="c",
                        placed_at=placed,
                    )
                )
        done = await migrations.upgrade(engine, store.schema)
        assert (done.from_revision, done.to_revision) == ("store_0003", "store_0005")
        async with engine.connect() as conn:
            certificate = await conn.scalar(text("SELECT tenant FROM lethe_certificates"))
            held: dict[str, str | None] = dict(
                (await conn.execute(text("SELECT id, tenant FROM lethe_holds"))).all()
            )
            if engine.dialect.name == "postgresql":
                secured = await conn.execute(
                    text(
                        "SELECT c.relname FROM pg_class c JOIN pg_policy p ON p.polrelid = c.oid "
                        "WHERE c.relrowsecurity AND p.polname = 'lethe_tenant_isolation'"
                    )
                )
                assert sorted(row[0] for row in secured) == sorted(TENANT_TABLES)
        assert certificate == MARY
        assert held == {"h-1": MARY, "h-2": None}
    finally:
        await engine.dispose()


@ON_POSTGRESQL
async def test_the_audit_query_pages_newest_first_on_its_index(url: str) -> None:
    """A tenant's entries of one action over a year, newest first, a page at a time; the query
    can use the ledger's tenant indexes."""
    engine = await store.engine_for(url)
    for n in range(5):
        for tenant in (MARY, LUKE):
            await ledger.append(
                engine,
                idempotency_key=f"{tenant}-{n}/done",
                request_id=f"{tenant}-{n}",
                subject_ref="-",
                actor="dpo",
                action="erasure.completed",
                tenant=tenant,
            )
    now = datetime.now(UTC)
    since, until = now - timedelta(days=365), now + timedelta(minutes=1)
    seen: list[tuple[str, dict[str, object]]] = []

    def capture(*args: Any) -> None:
        seen.append((str(args[2]), dict(args[3])))

    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    first = await ledger.search(
        engine, tenant=MARY, action="erasure.completed", limit=3, since=since, until=until
    )
    event.remove(engine.sync_engine, "before_cursor_execute", capture)
    rest = await ledger.search(
        engine,
        tenant=MARY,
        action="erasure.completed",
        before_seq=first[-1].seq,
        since=since,
        until=until,
    )
    assert [e.request_id for e in first + rest] == [f"{MARY}-{n}" for n in range(4, -1, -1)]
    statement, params = seen[-1]
    async with engine.begin() as conn:
        await conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        plan = "\n".join(
            row[0] for row in await conn.exec_driver_sql(f"EXPLAIN {statement}", params)
        )
    # Which of the ledger's time-ordered indexes depends on the statistics of so small a table;
    # none of them has the matching entries sorted whole.
    assert "Index Scan Backward using ix_lethe_ledger_" in plan, plan
    assert not re.search(r"^\s*(->\s+)?Sort\b", plan, re.MULTILINE), plan
