"""The SQL retention sweep on a SQLite file: what is due goes in keyset batches, what an
obligation, a hold, a scope or a missing date keeps stays, and bad input touches nothing."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Date,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    insert,
    select,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from lethe.activities.clients import Clients
from lethe.activities.common import SchemaMismatch
from lethe.activities.driver_errors import SchemaChanged
from lethe.activities.sql import SqlEraser, UnlinkNotPossible
from lethe.activities.sql_retention import CursorDoesNotFit, SweepNotPossible
from lethe.classification.datamap import SqlJoin, SqlRetentionDates, SqlTableLocator
from lethe.contracts import (
    Hold,
    HoldScope,
    RetentionAction,
    RuleTerm,
    ScopeMatch,
    SweepBatch,
    SweepResult,
    SweepTask,
)
from lethe.kernel.config import current_settings
from lethe.kernel.subjects import subject_ref
from tests.sweeps import totals

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
YEAR = timedelta(days=365)
SUBJECT_KEY = base64.b64encode(b"s" * 32).decode()
TENANTS = ["st-mary", "st-luke"]

metadata = MetaData()
visits = Table(
    "visits",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("patient_id", String(40)),
    Column("tenant", String(40)),
    Column("notes", Text),
    Column("created_at", DateTime),
    Column("closed_at", DateTime),
    Column("deleted_at", DateTime),
    Column("summary", Text),
)
lab_results = Table(
    "lab_results",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("visit_id", Integer),
    Column("result", Text),
    Column("taken_at", DateTime),
)
no_key = Table("no_key", metadata, Column("patient_id", String(40)), Column("at", DateTime))
events = Table(
    "events",
    metadata,
    Column("site", String(20), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("patient_id", String(40)),
    Column("on_day", Date),
)


def term(
    kind: str = "limit",
    period: timedelta = YEAR,
    trigger: str = "created",
    action: RetentionAction | None = "delete",
) -> RuleTerm:
    """A retention rule as a task carries it."""
    return RuleTerm.model_validate(
        {
            "rule": f"test.{kind}.{trigger}",
            "category": "user.health_and_medical",
            "kind": kind,
            "period": period,
            "trigger": trigger,
            "action": action if kind == "limit" else None,
            "citation": "test",
        }
    )


def visits_locator(**changes: Any) -> SqlTableLocator:
    """The visits table as the data map gives it."""
    fields: dict[str, Any] = {
        "table": "visits",
        "subject_column": "patient_id",
        "tenant_column": "tenant",
        "soft_delete_column": "deleted_at",
        "columns": {"patient_id": "user.health_and_medical", "notes": "user.health_and_medical"},
        "retention": {"created": "created_at", "closed": "closed_at"},
    }
    fields.update(changes)
    return SqlTableLocator.model_validate(fields)


def sweep_task(
    locator: SqlTableLocator | None = None,
    *,
    limit: RuleTerm | None = None,
    obligations: Sequence[RuleTerm] = (),
    scope: Sequence[ScopeMatch] = (),
    nulls: str = "report",
    connection: str = "LETHE_TEST_SWEEP_URL",
) -> SweepTask:
    """A sweep task over one table, its dates taken from the locator's retention."""
    locator = locator or visits_locator()
    retention = locator.retention or SqlRetentionDates(created="created_at")
    return SweepTask.model_validate(
        {
            "id": f"patients-db/{locator.table}",
            "system": "patients-db",
            "kind": "sql",
            "region": "eu",
            "connection": connection,
            "locator": locator,
            "tenants": TENANTS,
            "categories": locator.categories,
            "scope": list(scope),
            "limit": limit or term(),
            "obligations": list(obligations),
            "dates": retention.triggers,
            "nulls": nulls,
        }
    )


def hold(scope: HoldScope, value: str, hold_id: str = "hold-1") -> Hold:
    """An active legal hold."""
    return Hold(id=hold_id, matter="m-1", scope=scope, value=value, placed_by="dpo", placed_at=NOW)


def subject_hold(subject_id: str, tenant: str = "st-mary") -> Hold:
    """A hold on one subject, by reference (under the settings' subject key)."""
    ref = subject_ref(tenant, subject_id, current_settings().subject_key_bytes)
    return hold("subject", ref, "hold-subject")


async def sweep_all(
    eraser: SqlEraser, task: SweepTask, *, size: int = 7, holds: Sequence[Hold] = ()
) -> list[SweepResult]:
    """Every batch of a sweep, until done."""
    results: list[SweepResult] = []
    cursor: list[Any] | None = None
    while True:
        batch = SweepBatch(
            run_id="run-1", task=task, now=NOW, cursor=cursor, batch_size=size, holds=list(holds)
        )
        result = await eraser.sweep(batch)
        results.append(result)
        if result.done:
            return results
        assert result.cursor is not None and result.cursor != cursor
        cursor = result.cursor
        assert len(results) < 1000


async def ids(engine: AsyncEngine, table: Table = visits) -> set[int]:
    """The ids left in a table."""
    async with engine.connect() as conn:
        return set((await conn.execute(select(table.c.id))).scalars())


def visit(
    n: int,
    age_days: float | None,
    *,
    patient: str | None = None,
    tenant: str | None = "st-mary",
    closed_days: float | None = None,
) -> dict[str, Any]:
    """A visit created `age_days` before NOW (None: no date), its own patient unless given."""

    def ago(days: float | None) -> datetime | None:
        return None if days is None else (NOW - timedelta(days=days)).replace(tzinfo=None)

    return {
        "id": n,
        "patient_id": patient or f"p-{n}",
        "tenant": tenant,
        "notes": f"note {n}",
        "created_at": ago(age_days),
        "closed_at": ago(closed_days),
        "deleted_at": None,
        "summary": f"summary {n}",
    }


@pytest.fixture
async def eraser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SqlEraser]:
    """An eraser over a fresh SQLite file with the tables (and no rows)."""
    monkeypatch.setenv("LETHE_SUBJECT_KEY", SUBJECT_KEY)
    url = f"sqlite+aiosqlite:///{tmp_path / 'sweep.db'}"
    async with Clients() as clients:
        opened = SqlEraser.open(clients, url)
        async with opened.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        yield opened


async def seed(eraser: SqlEraser, rows: list[dict[str, Any]], table: Table = visits) -> None:
    """Insert rows."""
    async with eraser.engine.begin() as conn:
        await conn.execute(insert(table), rows)


async def test_due_rows_go_in_batches_and_the_rest_stays(eraser: SqlEraser) -> None:
    # 30 expired, 20 within the period, 5 undated, one a day short of its year.
    rows = [visit(n, 400 + n) for n in range(30)]
    rows += [visit(n, 10 + n) for n in range(30, 50)]
    rows += [visit(n, None) for n in range(50, 55)]
    rows.append(visit(55, 364))
    await seed(eraser, rows)
    results = await sweep_all(eraser, sweep_task())
    assert await ids(eraser.engine) == set(range(30, 56))
    assert totals(results) == (30, 0, 5)
    assert [r.removed for r in results[:4]] == [7, 7, 7, 7]
    assert results[0].undated == 5 and all(r.undated == 0 for r in results[1:])
    # Oldest first: the first batch covers the oldest dates.
    assert results[0].first == (NOW - timedelta(days=429)).replace(tzinfo=None).isoformat()
    assert results[0].cursor is not None and len(results[0].cursor) == 2
    again = await sweep_all(eraser, sweep_task())
    assert totals(again) == (0, 0, 5)


async def test_a_batch_run_again_from_its_cursor_removes_nothing_twice(
    eraser: SqlEraser,
) -> None:
    await seed(eraser, [visit(n, 400 + n) for n in range(20)])
    task = sweep_task()
    first = await eraser.sweep(SweepBatch(run_id="r", task=task, now=NOW, batch_size=5))
    left = await ids(eraser.engine)
    batch = SweepBatch(run_id="r", task=task, now=NOW, cursor=first.cursor, batch_size=5)
    second = await eraser.sweep(batch)
    again = await eraser.sweep(batch)
    assert first.removed == second.removed == again.removed == 5
    gone = left - await ids(eraser.engine)
    assert len(gone) == 10  # the retry took the next five, never the same rows again
    assert await ids(eraser.engine) == set(range(5))  # the youngest five are left


async def test_undated_rows_go_last_with_nulls_delete(eraser: SqlEraser) -> None:
    rows = [visit(n, 400) for n in range(10)] + [visit(n, None) for n in range(10, 20)]
    rows += [visit(n, 5) for n in range(20, 25)]
    await seed(eraser, rows)
    results = await sweep_all(eraser, sweep_task(nulls="delete"), size=4)
    assert await ids(eraser.engine) == set(range(20, 25))
    assert totals(results) == (20, 0, 0)
    cursors = [r.cursor for r in results[:-1]]
    assert [None] in cursors and all(c is not None for c in cursors)
    undated = results[cursors.index([None]) + 1 :]
    assert sum(r.removed for r in undated) == 10
    assert all(r.first is None and r.last is None for r in undated)
    assert all(c[0] is None for c in cursors[cursors.index([None]) :] if c)


async def test_obligations_keep_rows_until_they_end(eraser: SqlEraser) -> None:
    rows = [
        visit(1, 800, closed_days=800),  # both ended
        visit(2, 800, closed_days=30),  # the obligation runs on
        visit(3, 800, closed_days=None),  # the obligation's date is missing
        visit(4, None, closed_days=None),  # both missing: counted once
        visit(5, 30, closed_days=800),  # the limit has not ended
    ]
    await seed(eraser, rows)
    task = sweep_task(obligations=[term("obligation", 2 * YEAR, "closed")])
    results = await sweep_all(eraser, task)
    assert await ids(eraser.engine) == {2, 3, 4, 5}
    assert totals(results) == (1, 0, 2)


async def test_soft_delete_marks_once(eraser: SqlEraser) -> None:
    await seed(eraser, [visit(n, 400) for n in range(6)] + [visit(6, 3)])
    task = sweep_task(limit=term(action="soft_delete"))
    assert totals(await sweep_all(eraser, task, size=4)) == (6, 0, 0)
    async with eraser.engine.connect() as conn:
        marks = dict((await conn.execute(select(visits.c.id, visits.c.deleted_at))).all())
    assert {n for n, mark in marks.items() if mark is not None} == set(range(6))
    assert marks[0] == NOW.replace(tzinfo=None)
    assert totals(await sweep_all(eraser, task)) == (0, 0, 0)


async def test_anonymize_clears_and_unlinks(eraser: SqlEraser) -> None:
    await seed(eraser, [visit(1, 400), visit(2, 3)])
    task = sweep_task(limit=term(action="anonymize"))
    assert totals(await sweep_all(eraser, task)) == (1, 0, 0)
    async with eraser.engine.connect() as conn:
        rows = {row.id: row for row in (await conn.execute(select(visits))).all()}
    assert (rows[1].patient_id, rows[1].notes, rows[1].summary) == (None, None, "summary 1")
    assert rows[1].created_at is not None  # the sweep's date stays
    assert (rows[2].patient_id, rows[2].notes) == ("p-2", "note 2")
    assert totals(await sweep_all(eraser, task)) == (0, 0, 0)


async def test_holds_keep_their_rows_and_count_them(eraser: SqlEraser) -> None:
    rows = [visit(n, 400, patient="p-held" if n < 3 else None) for n in range(10)]
    rows += [visit(n, 400, tenant="st-luke") for n in range(10, 14)]
    rows += [visit(14, 400, tenant=None)]
    await seed(eraser, rows)
    holds = [subject_hold("p-held"), hold("tenant", "st-luke", "hold-tenant")]
    results = await sweep_all(eraser, sweep_task(), size=3, holds=holds)
    assert await ids(eraser.engine) == {0, 1, 2, 10, 11, 12, 13}
    assert totals(results) == (8, 7, 0)
    assert results[0].held >= 4  # the held tenant's rows, counted once at the start


async def test_a_hold_on_the_system_keeps_everything(eraser: SqlEraser) -> None:
    await seed(eraser, [visit(n, 400) for n in range(5)] + [visit(5, None)])
    batch = SweepBatch(
        run_id="r",
        task=sweep_task(),
        now=NOW,
        batch_size=2,
        holds=[hold("system", "patients-db", "hold-sys")],
    )
    result = await eraser.sweep(batch)
    assert (result.removed, result.held, result.undated, result.done) == (0, 5, 1, True)
    assert "hold-sys" in result.detail
    assert len(await ids(eraser.engine)) == 6


async def test_a_subject_hold_through_a_join_path(eraser: SqlEraser) -> None:
    await seed(
        eraser, [visit(1, 1, patient="p-held"), visit(2, 1, patient="p-other", tenant="st-luke")]
    )
    old = (NOW - timedelta(days=400)).replace(tzinfo=None)
    labs = [
        {
            "id": n,
            "visit_id": 1 if n < 3 else (2 if n < 6 else None),
            "result": "r",
            "taken_at": old,
        }
        for n in range(8)
    ]
    await seed(eraser, labs, lab_results)
    locator = SqlTableLocator.model_validate(
        {
            "table": "lab_results",
            "subject_column": "patient_id",
            "tenant_column": "tenant",
            "via": [SqlJoin(column="visit_id", table="visits", references="id")],
            "columns": {"result": "user.health_and_medical"},
            "retention": {"created": "taken_at"},
        }
    )
    task = sweep_task(locator)
    batch = SweepBatch(
        run_id="r",
        task=task,
        now=NOW,
        batch_size=100,
        dry_run=True,
        holds=[subject_hold("p-held")],
        samples=2,
    )
    dry = await eraser.sweep(batch)
    assert (dry.removed, dry.held, dry.samples) == (5, 3, ["3", "4"])
    results = await sweep_all(eraser, task, size=3, holds=[subject_hold("p-held")])
    assert totals(results) == (5, 3, 0)
    assert await ids(eraser.engine, lab_results) == {0, 1, 2}
    # A tenant hold through the path: the tenant column is beside the subject.
    await seed(eraser, [{"id": 10, "visit_id": 2, "result": "r", "taken_at": old}], lab_results)
    held = await sweep_all(eraser, task, holds=[hold("tenant", "st-mary")])
    assert totals(held) == (1, 3, 0)  # rows 0-2 are st-mary's (through visit 1), row 10 not
    assert await ids(eraser.engine, lab_results) == {0, 1, 2}


async def test_scopes_narrow_the_rows(eraser: SqlEraser) -> None:
    rows = [visit(1, 400, tenant="st-mary"), visit(2, 400, tenant="st-luke")]
    rows += [visit(3, 400, tenant="other"), visit(4, 400, tenant=None)]
    await seed(eraser, rows)

    async def scoped(match: ScopeMatch) -> set[int]:
        before = await ids(eraser.engine)
        await sweep_all(eraser, sweep_task(scope=[match]))
        return before - await ids(eraser.engine)

    assert await scoped(ScopeMatch(key="tenant", field="tenant", others=["st-mary"])) == {2, 3}
    assert await scoped(ScopeMatch(key="tenant", field="tenant", null=True)) == {4}
    assert await scoped(ScopeMatch(key="tenant", field="tenant", values=["st-mary"])) == {1}


async def test_a_dry_run_counts_and_touches_nothing(eraser: SqlEraser) -> None:
    rows = [visit(n, 400) for n in range(10)] + [visit(n, None) for n in range(10, 12)]
    rows += [visit(12, 400, tenant="st-luke")]
    await seed(eraser, rows)
    batch = SweepBatch(
        run_id="r",
        task=sweep_task(),
        now=NOW,
        batch_size=2,
        dry_run=True,
        samples=3,
        holds=[hold("tenant", "st-luke")],
    )
    result = await eraser.sweep(batch)
    assert (result.removed, result.held, result.undated, result.done) == (10, 1, 2, True)
    assert result.samples == ["0", "1", "2"]
    assert len(await ids(eraser.engine)) == 13
    # A primary key that is the subject column is never shown.
    personal = visits_locator(columns={"id": "user.health_and_medical"})
    keyless = batch.model_copy(update={"task": sweep_task(personal)})
    assert (await eraser.sweep(keyless)).samples == []


async def test_bad_date_columns_are_refused_and_nothing_goes(eraser: SqlEraser) -> None:
    await seed(eraser, [visit(n, 400) for n in range(3)])
    missing = sweep_task(visits_locator(retention={"created": "created_on"}))
    with pytest.raises(SchemaMismatch, match=r"table 'visits' has no column 'created_on'"):
        await sweep_all(eraser, missing)
    text = sweep_task(visits_locator(retention={"created": "summary"}))
    with pytest.raises(SchemaMismatch, match=r"column 'summary' of table 'visits' .*not a date"):
        await sweep_all(eraser, text)
    assert len(await ids(eraser.engine)) == 3


async def test_a_table_without_a_primary_key_is_refused(eraser: SqlEraser) -> None:
    locator = SqlTableLocator.model_validate(
        {
            "table": "no_key",
            "subject_column": "patient_id",
            "columns": {"patient_id": "user.health_and_medical"},
            "retention": {"created": "at"},
        }
    )
    with pytest.raises(SweepNotPossible, match="no primary key"):
        await sweep_all(eraser, sweep_task(locator))


async def test_anonymize_refuses_a_link_it_cannot_null(eraser: SqlEraser) -> None:
    locator = visits_locator(unlink="surrogate")
    with pytest.raises(UnlinkNotPossible, match="patient_id"):
        await sweep_all(eraser, sweep_task(locator, limit=term(action="anonymize")))


async def test_a_composite_key_and_a_date_column(eraser: SqlEraser) -> None:
    # A DATE is past only once its whole day is: 2025-05-31 is, 2025-06-01 (NOW - 365d) not.
    days = [date(2025, 5, 31), date(2025, 6, 1), date(2024, 1, 1), None]
    keys = [(site, n) for site in ("b", "a", "B", "ä") for n in range(8)]
    rows = [{"site": k[0], "seq": k[1], "patient_id": f"p-{k[1] % 3}"} for k in keys]
    await seed(
        eraser,
        [{**row, "on_day": days[k[1] % 4]} for row, k in zip(rows, keys, strict=True)],
        events,
    )
    locator = SqlTableLocator.model_validate(
        {
            "table": "events",
            "subject_column": "patient_id",
            "columns": {"patient_id": "user.health_and_medical"},
            "retention": {"created": "on_day"},
        }
    )
    results = await sweep_all(eraser, sweep_task(locator), size=3, holds=[subject_hold("p-1")])
    async with eraser.engine.connect() as conn:
        left = {tuple(row) for row in (await conn.execute(select(events.c.site, events.c.seq)))}
    gone = {k for k in keys if k[1] % 4 in (0, 2)}
    held = {k for k in gone if k[1] % 3 == 1}
    assert left == set(keys) - (gone - held)
    assert totals(results) == (len(gone - held), len(held), 8)
    assert all(len(r.cursor or [None] * 3) == 3 for r in results)
    assert results[0].first == "2024-01-01"


async def test_a_column_dropped_mid_sweep_is_named_and_nothing_goes(eraser: SqlEraser) -> None:
    await seed(eraser, [visit(n, 400, closed_days=800) for n in range(6)])
    task = sweep_task(obligations=[term("obligation", YEAR, "closed")])
    first = await eraser.sweep(SweepBatch(run_id="r", task=task, now=NOW, batch_size=2))
    assert first.removed == 2
    async with eraser.engine.begin() as conn:
        await conn.exec_driver_sql("ALTER TABLE visits DROP COLUMN closed_at")
    # The kept description still has the column: the statement fails, the description goes.
    batch = SweepBatch(run_id="r", task=task, now=NOW, batch_size=2, cursor=first.cursor)
    with pytest.raises(SchemaChanged) as changed:
        await eraser.sweep(batch)
    assert changed.value.retryable
    with pytest.raises(SchemaMismatch, match=r"table 'visits' has no column 'closed_at'"):
        await eraser.sweep(batch)
    assert len(await ids(eraser.engine)) == 4


async def test_anonymize_through_a_join_path_unlinks_the_first_hop(eraser: SqlEraser) -> None:
    await seed(eraser, [visit(1, 1)])
    old, new = [(NOW - timedelta(days=d)).replace(tzinfo=None) for d in (400, 3)]
    labs = [
        {"id": 1, "visit_id": 1, "result": "r1", "taken_at": old},
        {"id": 2, "visit_id": 1, "result": "r2", "taken_at": new},
    ]
    await seed(eraser, labs, lab_results)
    locator = SqlTableLocator.model_validate(
        {
            "table": "lab_results",
            "subject_column": "patient_id",
            "via": [SqlJoin(column="visit_id", table="visits", references="id")],
            "columns": {"result": "user.health_and_medical"},
            "retention": {"created": "taken_at"},
        }
    )
    task = sweep_task(locator, limit=term(action="anonymize"))
    assert totals(await sweep_all(eraser, task, holds=[subject_hold("p-9")])) == (1, 0, 0)
    async with eraser.engine.connect() as conn:
        rows = sorted(tuple(row) for row in (await conn.execute(select(lab_results))).all())
    assert rows == [(1, None, None, old), (2, 1, "r2", new)]
    assert totals(await sweep_all(eraser, task)) == (0, 0, 0)


@pytest.mark.parametrize("cursor", [[], ["not a date", 1], ["2025-01-01T00:00:00", 1, 2]])
async def test_a_cursor_that_does_not_fit_is_refused(
    eraser: SqlEraser, cursor: list[str | int]
) -> None:
    await seed(eraser, [visit(1, 400)])
    batch = SweepBatch(run_id="r", task=sweep_task(), now=NOW, batch_size=5, cursor=list(cursor))
    with pytest.raises(CursorDoesNotFit, match=r"primary key of table 'visits' \(id\)"):
        await eraser.sweep(batch)
    assert await ids(eraser.engine) == {1}
