"""`lethe datamap check --live` against the stack's PostgreSQL: a date column that does not exist
and one typed as text are both named (system, table, column, path in the map), a table dated as
the map says passes, an unreachable database is named without its URL, and nothing is written."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from tests.e2e.conftest import run_lethe

VARIABLE = "LETHE_TEST_CLINIC_DB"
GOOD_TABLE = """\
      - table: {schema}.visits
        subject_column: patient_id
        tenant_column: tenant_id
        columns: {{notes: user.health_and_medical.encounter}}
        retention:
          created: created_at
          closed: closed_on
          scopes: {{tenant: tenant_id}}
"""
BAD_TABLE = """\
      - table: {schema}.notes
        subject_column: patient_id
        tenant_column: tenant_id
        columns: {{body: user.health_and_medical.encounter}}
        retention:
          created: written
          closed: closed_at
"""
MAP = """\
version: 1
regions: [eu]
tenants:
  acme: {{region: eu}}
systems:
  - name: clinic-db
    kind: sql
    region: eu
    connection: {variable}
    tables:
"""


@pytest.fixture
async def schema(sql_url: str) -> AsyncIterator[str]:
    """A schema of the test's own: visits dated as the map says, notes not; dropped after."""
    name = f"lethe_dm_{uuid.uuid4().hex[:12]}"
    engine = create_async_engine(sql_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f"CREATE SCHEMA {name}"))
            await conn.execute(
                text(
                    f"CREATE TABLE {name}.visits (patient_id text, tenant_id text, notes text, "
                    "created_at timestamptz NOT NULL, closed_on date)"
                )
            )
            await conn.execute(
                text(
                    f"CREATE TABLE {name}.notes (patient_id text, tenant_id text, body text, "
                    "written text)"
                )
            )
            await conn.execute(
                text(f"INSERT INTO {name}.notes VALUES ('p-1', 'acme', 'b', 'last week')")
            )
        yield name
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP SCHEMA IF EXISTS {name} CASCADE"))
        await engine.dispose()


def _map(folder: Path, schema: str, *tables: str) -> Path:
    path = folder / "datamap.yaml"
    path.write_text(
        MAP.format(variable=VARIABLE) + "".join(t.format(schema=schema) for t in tables)
    )
    return path


async def test_missing_and_text_typed_date_columns_are_named_and_a_dated_table_passes(
    tmp_path: Path, schema: str, sql_url: str
) -> None:
    env = {**os.environ, VARIABLE: sql_url}
    both = _map(tmp_path, schema, GOOD_TABLE, BAD_TABLE)
    checked = await run_lethe(env, "datamap", "check", "--datamap", str(both), "--live")
    assert checked.code == 1, checked
    table = f"system 'clinic-db': table '{schema}.notes'"
    assert checked.stdout.splitlines() == [
        "clinic-db: checked (2 tables with retention dates)",
        f"{both}:24: systems[0].tables[1].retention.created: {table}: column 'written' (the "
        "created date) is TEXT, not a date or time type (DATE, TIMESTAMP, DATETIME)",
        f"{both}:25: systems[0].tables[1].retention.closed: {table} has no column 'closed_at' "
        "(the closed date)",
    ]
    assert checked.stderr == f"2 problems in {both}\n"

    report = (
        await run_lethe(env, "datamap", "check", "--datamap", str(both), "--live", "--json")
    ).json()
    assert [(p["system"], p["table"], p["column"]) for p in report["problems"]] == [
        ("clinic-db", f"{schema}.notes", "written"),
        ("clinic-db", f"{schema}.notes", "closed_at"),
    ]

    good = _map(tmp_path, schema, GOOD_TABLE)
    passed = await run_lethe(env, "datamap", "check", "--datamap", str(good), "--live")
    assert passed.code == 0, passed
    assert passed.stdout == (
        "clinic-db: checked (1 table with retention dates)\n"
        f"ok: {good}: 1 system, 1 locator, 1 with retention dates\n"
    )

    engine = create_async_engine(sql_url)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(text(f"SELECT * FROM {schema}.notes"))).all()
    finally:
        await engine.dispose()
    assert [tuple(row) for row in rows] == [("p-1", "acme", "b", "last week")]


async def test_an_unreachable_database_is_named_never_its_url(
    tmp_path: Path, schema: str, sql_url: str
) -> None:
    password = f"wrong-{uuid.uuid4().hex[:8]}"
    wrong = make_url(sql_url).set(port=1, password=password).render_as_string(hide_password=False)
    path = _map(tmp_path, schema, GOOD_TABLE)
    checked = await run_lethe(
        {**os.environ, VARIABLE: wrong}, "datamap", "check", "--datamap", str(path), "--live"
    )
    assert checked.code == 1, checked
    assert checked.stdout.splitlines()[0].startswith(
        "clinic-db: unreachable (system 'clinic-db' did not answer (OperationalError"
    )
    assert f"{path}:6: systems[0]: unreachable: " in checked.stdout
    assert password not in checked.stdout + checked.stderr
