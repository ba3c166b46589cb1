"""Lethe's schemas under Alembic, on the stack's PostgreSQL and on SQLite.

An empty database is upgraded to the models; a database made by the code before migrations
(its DDL frozen in `pre_migration/`) is adopted with its ledger's chain intact; a schema behind
its head is refused when LETHE_DB_MIGRATE=refuse; tables Lethe did not make are refused and
left alone; processes starting together upgrade once; `lethe db` and the worker say so.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Column, MetaData, Text, insert, inspect, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from lethe.contracts import LedgerEntry
from lethe.evidence import ledger, store
from lethe.kernel import database, migrations
from lethe.kernel.migrations import ForeignSchema, Schema, SchemaBehind
from lethe.keys import store as key_store
from tests.e2e.conftest import ROOT, run_lethe

PRE_MIGRATION = Path(__file__).resolve().parent / "pre_migration"
SCHEMAS = (store.schema, key_store.schema)
VERSION_TABLES = frozenset(schema.version_table for schema in SCHEMAS)
REF = "ab" * 16


@pytest.fixture(params=["postgresql", "sqlite"])
async def url(request: pytest.FixtureRequest, sql_url: str, tmp_path: Path) -> AsyncIterator[str]:
    """A new, empty database: on the stack's PostgreSQL, or a SQLite file."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'lethe.db'}"
        await database.dispose_all()
        return
    name = f"migrations_{uuid.uuid4().hex[:10]}"
    admin = create_async_engine(sql_url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield sql_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        await database.dispose_all()
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        await admin.dispose()


async def _execute(engine: AsyncEngine, script: str) -> None:
    """Run the statements of an SQL script (one per `;` at a line's end) in one transaction."""
    async with engine.begin() as conn:
        for statement in script.split(";\n"):
            body = "\n".join(line for line in statement.splitlines() if not line.startswith("--"))
            if body.strip():
                await conn.exec_driver_sql(body)


async def _made_before_migrations(url: str) -> AsyncEngine:
    """The database as the code before migrations left it: both schemas' tables (frozen DDL),
    the ledger's head row, and no version table. An engine that runs no migration."""
    engine = database.new_engine(url)
    dialect = engine.dialect.name
    for name in ("store", "keys"):
        await _execute(engine, (PRE_MIGRATION / f"{name}.{dialect}.sql").read_text())
    return engine


async def _append(engine: AsyncEngine, n: int) -> str:
    entry = await ledger.append(
        engine,
        idempotency_key=f"req-{n}/step",
        request_id=f"req-{n}",
        subject_ref=REF,
        actor="dpo",
        action="step.done",
        system="patients-db",
        details={"affected": n, "note": f"entry {n}"},
    )
    return entry.hash


OLD_LEDGER = migrations.baseline_tables(store.schema).tables["lethe_ledger"]
OLD_HEAD = migrations.baseline_tables(store.schema).tables["lethe_ledger_head"]


async def _append_before_migrations(engine: AsyncEngine, n: int) -> str:
    """An entry appended as the code before migrations did (its columns, its hash)."""
    details: ledger.Details = {"affected": n, "note": f"entry {n}"}
    fields = {"request_id": f"req-{n}", "subject_ref": REF, "actor": "dpo", "action": "step.done"}
    async with engine.begin() as conn:
        head = (await conn.execute(select(OLD_HEAD).where(OLD_HEAD.c.id == 1))).one()
        seq, at = head.seq + 1, datetime.now(UTC)
        digest = ledger.entry_hash(
            seq=seq,
            at=at,
            system="patients-db",
            details=details,
            prev_hash=head.hash,
            **fields,
        )
        await conn.execute(
            insert(OLD_LEDGER).values(
                seq=seq,
                at=at,
                system="patients-db",
                details=details,
                prev_hash=head.hash,
                hash=digest,
                idempotency_key=f"req-{n}/step",
                **fields,
            )
        )
        await conn.execute(update(OLD_HEAD).where(OLD_HEAD.c.id == 1).values(seq=seq, hash=digest))
    return digest


async def _entries_before_migrations(engine: AsyncEngine) -> list[LedgerEntry]:
    async with engine.connect() as conn:
        rows = await conn.execute(select(OLD_LEDGER).order_by(OLD_LEDGER.c.seq))
        found = [dict(row._mapping) for row in rows]
    for fields in found:
        fields.pop("idempotency_key")
        if fields["at"].tzinfo is None:
            fields["at"] = fields["at"].replace(tzinfo=UTC)
    return [LedgerEntry.model_validate(fields) for fields in found]


async def _tables(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))


async def _differences_from_models(engine: AsyncEngine, schema: Schema) -> list[str]:
    """How the database differs from the schema's models (its version tables and the other
    schema's tables aside)."""
    others = {name for s in SCHEMAS if s is not schema for name in s.tables.tables}
    ignore = VERSION_TABLES | others
    async with engine.connect() as conn:
        return await conn.run_sync(
            lambda sync: migrations.differences(sync, schema.tables, ignore=ignore)
        )


async def test_an_empty_database_is_upgraded_to_exactly_the_models(url: str) -> None:
    engine = await store.engine_for(url)
    await key_store.key_engine(url)

    for schema in SCHEMAS:
        found = await migrations.status(engine, schema)
        assert (found.state, found.revision) == ("current", migrations.head(schema))
        # A change to the models without a migration fails here.
        assert await _differences_from_models(engine, schema) == [], schema.name
    assert await _tables(engine) == VERSION_TABLES | {
        name for schema in SCHEMAS for name in schema.tables.tables
    }

    hashes = [await _append(engine, n) for n in range(3)]
    report = await ledger.verify_chain(engine)
    assert (report.entries, report.intact) == (3, True)
    assert [e.hash for e in await ledger.entries(engine)] == hashes


async def test_a_model_changed_without_a_migration_shows(url: str) -> None:
    engine = await store.engine_for(url)
    changed = MetaData()
    for table in store.metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["lethe_holds"].append_column(Column("court", Text))
    async with engine.connect() as conn:
        found = await conn.run_sync(
            lambda sync: migrations.differences(sync, changed, only=set(store.metadata.tables))
        )
    assert found == ["table lethe_holds lacks column court"]


async def test_the_baselines_make_what_create_all_made_before_migrations(url: str) -> None:
    """The frozen DDL and the baseline revisions agree, so adoption recognises real databases."""
    engine = await _made_before_migrations(url)
    try:
        for schema in SCHEMAS:
            found = await migrations.status(engine, schema)
            assert (found.state, found.revision, found.problems) == ("unversioned", None, ())
    finally:
        await engine.dispose()


async def test_a_database_made_before_migrations_is_adopted_with_its_ledger_intact(
    url: str,
) -> None:
    old = await _made_before_migrations(url)
    before = [await _append_before_migrations(old, n) for n in range(5)]
    key = key_store.DataKeyRow(REF, 1, "st-mary", 1, b"wrapped-key", 0)
    assert await key_store.add_key(old, key) == "added"
    entries_before = await _entries_before_migrations(old)
    await old.dispose()

    engine = await store.engine_for(url)  # LETHE_DB_MIGRATE=auto: adopt, then upgrade
    keys = await key_store.key_engine(url)

    for schema in SCHEMAS:
        found = await migrations.status(engine, schema)
        assert (found.state, found.revision) == ("current", migrations.head(schema))
        assert await _differences_from_models(engine, schema) == [], schema.name
    assert await ledger.entries(engine) == entries_before
    report = await ledger.verify_chain(engine)
    assert (report.entries, report.problems) == (5, [])
    after = await _append(engine, 5)  # the chain goes on from the adopted head
    chain = await ledger.entries(engine)
    assert [e.hash for e in chain] == [*before, after]
    assert chain[-1].prev_hash == before[-1]
    assert (await ledger.verify_chain(engine)).intact
    kept = await key_store.latest_key(keys, REF)
    assert kept is not None and kept.wrapped == b"wrapped-key"


async def test_the_cli_upgrade_adopts_and_says_from_where_to_where(url: str) -> None:
    old = await _made_before_migrations(url)
    await _append_before_migrations(old, 1)
    await old.dispose()
    env = {**os.environ, "LETHE_STORE_URL": url, "LETHE_KEYS_STORE_URL": url}

    status = await run_lethe(env, "db", "status", "--json")
    assert status.code == 1, status
    assert [(s["schema_key"], s["state"]) for s in status.json()] == [
        ("store", "unversioned"),
        ("keys", "unversioned"),
    ]

    upgraded = await run_lethe(env, "db", "upgrade", "--store")
    assert upgraded.code == 0, upgraded
    assert "Lethe's store: upgraded from none (tables made before migrations" in upgraded.stdout
    assert "adopted as" in upgraded.stdout and "store_0001) to store_0005" in upgraded.stdout
    assert "key store" not in upgraded.stdout

    status = await run_lethe(env, "db", "status", "--json")
    assert [(s["revision"], s["state"]) for s in status.json()] == [
        ("store_0005", "current"),
        (None, "unversioned"),
    ]
    upgraded = await run_lethe(env, "db", "upgrade")
    assert upgraded.code == 0, upgraded
    assert "Lethe's store: at store_0005, the head; nothing to do" in upgraded.stdout
    assert "the key store: upgraded from none" in upgraded.stdout

    status = await run_lethe(env, "db", "status")
    assert status.code == 0, status
    assert status.stdout.count("up to date") == 2, status
    engine = database.new_engine(url)
    try:
        assert (await ledger.verify_chain(engine)).entries == 1
    finally:
        await engine.dispose()


async def test_refuse_mode_names_the_store_its_revision_the_head_and_the_command(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LETHE_DB_MIGRATE", "refuse")
    with pytest.raises(SchemaBehind) as refused:
        await store.engine_for(url)
    message = str(refused.value)
    assert "Lethe's store is at revision none (no tables yet)" in message
    assert "needs store_0005" in message
    assert "`lethe db upgrade`" in message
    assert "@" not in message and "sqlite" not in message  # the store's name, not its URL
    engine = database.new_engine(url)
    try:
        assert await _tables(engine) == set()  # refused: nothing made
    finally:
        await engine.dispose()

    await database.dispose_all()
    old = await _made_before_migrations(url)
    await old.dispose()
    with pytest.raises(SchemaBehind, match=r"the key store is at revision none \(tables made"):
        await key_store.key_engine(url)

    done = await database.upgrade_schema(url, key_store.schema)
    assert (done.from_revision, done.to_revision, done.adopted) == (None, "keys_0001", True)
    await key_store.key_engine(url)  # at its head: refuse mode lets it through


def _two_revision_schema(folder: Path, *, with_second: bool) -> Schema:
    """A schema of one table whose second revision adds a column (a real later migration)."""
    folder.mkdir(exist_ok=True)
    (folder / "t_0001_baseline.py").write_text(
        "from alembic import op\n"
        "from sqlalchemy import Column, Integer, MetaData, String, Table\n"
        "revision = 't_0001'\ndown_revision = None\n"
        "TABLES = MetaData()\n"
        "Table('lethe_migration_probe', TABLES, Column('id', Integer, primary_key=True),\n"
        "      Column('name', String(20), nullable=False))\n"
        "def upgrade():\n    TABLES.create_all(op.get_bind())\n"
    )
    if with_second:
        (folder / "t_0002_note.py").write_text(
            "import sqlalchemy as sa\nfrom alembic import op\n"
            "revision = 't_0002'\ndown_revision = 't_0001'\n"
            "def upgrade():\n"
            "    op.add_column('lethe_migration_probe', sa.Column('note', sa.Text()))\n"
        )
    return Schema(
        key="probe",
        name="the probe store",
        tables=store.metadata,
        versions=folder,
        version_table="lethe_probe_version",
        baseline="t_0001",
    )


async def test_a_schema_behind_its_head_is_refused_then_upgraded_keeping_its_rows(
    url: str, tmp_path: Path
) -> None:
    first = _two_revision_schema(tmp_path / "v1", with_second=False)
    engine = database.new_engine(url)
    try:
        await migrations.upgrade(engine, first)
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO lethe_migration_probe (id, name) VALUES (1, 'a')"))

        later = _two_revision_schema(tmp_path / "v2", with_second=True)
        found = await migrations.status(engine, later)
        assert (found.state, found.revision, found.head) == ("behind", "t_0001", "t_0002")
        with pytest.raises(
            SchemaBehind, match=r"the probe store is at revision t_0001.*needs t_0002"
        ):
            await migrations.ensure(engine, later, "refuse")

        done = await migrations.ensure(engine, later, "auto")
        assert (done.state, done.revision) == ("current", "t_0002")
        async with engine.connect() as conn:
            rows = (
                await conn.execute(text("SELECT id, name, note FROM lethe_migration_probe"))
            ).all()
        assert [tuple(row) for row in rows] == [(1, "a", None)]

        # A database upgraded by a newer Lethe is not taken for one to upgrade.
        with pytest.raises(
            ForeignSchema, match="at revision t_0002, which this version of Lethe does not know"
        ):
            await migrations.ensure(engine, first, "auto")
    finally:
        await engine.dispose()


async def test_tables_that_lethe_did_not_make_are_refused_and_left_alone(url: str) -> None:
    engine = database.new_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text("CREATE TABLE lethe_ledger (seq INTEGER PRIMARY KEY, note VARCHAR(10))")
            )
        with pytest.raises(ForeignSchema) as refused:
            await store.engine_for(url)
        message = str(refused.value)
        assert message.startswith("Lethe's store holds tables that are not as Lethe makes them")
        assert "table lethe_ledger lacks columns at, request_id, subject_ref," in message
        assert "column lethe_ledger.note is not one Lethe makes" in message
        assert "tables missing: lethe_certificates, lethe_forget_list, lethe_holds" in message
        assert "Nothing was changed" in message
        assert await _tables(engine) == {"lethe_ledger"}  # no version table, nothing made

        status = await migrations.status(engine, store.schema)
        assert status.state == "foreign"
        # The key store's schema in the same database is not affected by the store's.
        assert (await migrations.status(engine, key_store.schema)).state == "empty"
    finally:
        await engine.dispose()


async def test_a_changed_column_is_named(url: str) -> None:
    """A table made before migrations, then changed by hand (a column narrowed), is refused."""
    engine = database.new_engine(url)
    try:
        ddl = (PRE_MIGRATION / f"keys.{engine.dialect.name}.sql").read_text()
        narrowed = ddl.replace("tenant VARCHAR(100) NOT NULL", "tenant VARCHAR(10) NOT NULL", 1)
        assert narrowed != ddl
        await _execute(engine, narrowed)
        with pytest.raises(ForeignSchema, match="tenant is VARCHAR\\(10\\), not VARCHAR\\(100\\)"):
            await migrations.upgrade(engine, key_store.schema)
        assert key_store.schema.version_table not in await _tables(engine)
    finally:
        await engine.dispose()


async def test_processes_starting_together_upgrade_once(url: str) -> None:
    """Several engines (as several workers would) upgrade one new database at once: the lock
    lets one make the tables; the others wait and find the head."""
    engines = [database.new_engine(url) for _ in range(4)]
    try:
        done = await asyncio.gather(*(migrations.upgrade(e, store.schema) for e in engines))
    finally:
        for engine in engines:
            await engine.dispose()
    assert sorted(d.from_revision or "none" for d in done) == [
        "none",
        "store_0005",
        "store_0005",
        "store_0005",
    ]
    assert {d.to_revision for d in done} == {"store_0005"}


async def test_a_worker_refusing_a_schema_behind_stops_at_start(tmp_path: Path) -> None:
    """LETHE_DB_MIGRATE=refuse and an empty store: the worker stops before it polls, with the
    message, without reaching Temporal (an address nothing listens on)."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'lethe.db'}"
    env = {
        **os.environ,
        "LETHE_STORE_URL": url,
        "LETHE_KEYS_STORE_URL": url,
        "LETHE_DB_MIGRATE": "refuse",
        "LETHE_TEMPORAL_ADDRESS": "127.0.0.1:9",
    }
    code, stderr = await _worker_ends(env)
    assert code == 2, stderr
    assert "lethe worker: the key store is at revision none" in stderr
    assert "`lethe db upgrade`" in stderr

    env["LETHE_DB_MIGRATE"] = "auto"
    upgraded = await run_lethe(env, "db", "upgrade")
    assert upgraded.code == 0, upgraded
    status = await run_lethe(env, "db", "status")
    assert status.code == 0, status
    # Both at their heads now: the same worker gets past the check (and fails on Temporal).
    env["LETHE_DB_MIGRATE"] = "refuse"
    _, stderr = await _worker_ends(env)
    assert "revision" not in stderr
    assert "Temporal" in stderr, stderr


async def _worker_ends(env: dict[str, str]) -> tuple[int | None, str]:
    """Run `worker.py --region eu --control` with `env` until it ends: its exit code, stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "worker.py",
        "--region",
        "eu",
        "--control",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, stderr.decode()
