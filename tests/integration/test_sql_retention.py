"""The SQL retention sweep against the stack's PostgreSQL, through the `sql.sweep` activity.

Each test gets its own schema with a `visits` table made by generate_series. After a sweep, SQL
checks that exactly the expired rows outside holds are gone and that every other row is
byte-identical (the md5 of each row's text, taken before).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from lethe.activities.connectors import Connectors
from lethe.contracts import Hold, ScopeMatch, SweepBatch, SweepResult, SweepTask
from tests.sweeps import region_env, sweep_all, sweep_batch, sweep_once, totals
from tests.unit.test_sql_retention import (
    NOW,
    YEAR,
    hold,
    subject_hold,
    sweep_task,
    term,
    visits_locator,
)

ROWS = 200_000
SIZE = 5_000
EXPIRED = "id % 2 = 0 AND id % 1000 <> 8"
"""Rows created 400 days or more before NOW; the others 299 days or less, or undated."""
UNDATED = "id % 1000 IN (7, 8)"
HELD_TENANT = "id % 100 = 0"
"""st-luke's rows, all expired."""
HELD_SUBJECT = "id % 50000 = 124"
"""p-124's rows (of st-mary), all expired."""


@dataclasses.dataclass
class Visits:
    """One test's schema, its visits table, and the activity environment to sweep it."""

    engine: AsyncEngine
    schema: str
    env: ActivityEnvironment
    connectors: Connectors
    beats: list[Any]

    async def scalar(self, sql: str) -> Any:
        """One value of a query on the schema (`visits` and `snapshot` are its tables)."""
        async with self.engine.connect() as conn:
            await conn.execute(text(f"SET search_path TO {self.schema}"))
            return (await conn.execute(text(sql))).scalar_one()

    async def run(self, sql: str) -> None:
        """Run statements on the schema."""
        async with self.engine.begin() as conn:
            await conn.execute(text(f"SET search_path TO {self.schema}"))
            for statement in sql.split(";"):
                if statement.strip():
                    await conn.execute(text(statement))

    async def snapshot(self, gone: str) -> None:
        """Take each row's md5 and whether the sweep should remove it (`gone`, by id)."""
        await self.run(
            "DROP TABLE IF EXISTS snapshot;"
            f"CREATE TABLE snapshot AS SELECT id, md5(v::text) AS hash, ({gone}) AS gone "
            "FROM visits v"
        )

    async def mismatches(self) -> tuple[int, int]:
        """(rows gone or left against the snapshot's expectation, left rows that changed)."""
        wrong = await self.scalar(
            "SELECT count(*) FROM snapshot s LEFT JOIN visits v ON v.id = s.id "
            "WHERE (v.id IS NULL) <> s.gone"
        )
        changed = await self.scalar(
            "SELECT count(*) FROM snapshot s JOIN visits v ON v.id = s.id "
            "WHERE md5(v::text) <> s.hash"
        )
        return wrong, changed

    def task(self, **changes: Any) -> SweepTask:
        """A task over this schema's visits."""
        locator = changes.pop("locator", None) or visits_locator(table=f"{self.schema}.visits")
        return sweep_task(locator, **changes)

    async def sweep(self, batch: SweepBatch) -> SweepResult:
        """One `sql.sweep` activity call."""
        return await sweep_once(self.connectors, batch, env=self.env)

    async def sweep_all(
        self, task: SweepTask, *, holds: Sequence[Hold] = (), size: int = SIZE
    ) -> list[SweepResult]:
        """Call `sql.sweep` with the last cursor until it is done."""
        batch = sweep_batch(task, NOW, batch_size=size, holds=holds)
        return await sweep_all(self.connectors, batch, env=self.env, most=200)


async def seeded(visits: Visits, rows: int) -> None:
    """The visits table with `rows` rows: ids 1..rows, half expired, a few undated."""
    await visits.run(
        f"""
        CREATE TABLE visits (
            id bigint PRIMARY KEY,
            patient_id text NOT NULL,
            tenant text,
            notes text,
            created_at timestamptz,
            closed_at timestamptz,
            deleted_at timestamptz,
            summary text
        );
        INSERT INTO visits
        SELECT g,
               'p-' || (g % 50000),
               CASE WHEN g % 100 = 0 THEN 'st-luke' ELSE 'st-mary' END,
               md5(g::text),
               CASE WHEN g % 1000 IN (7, 8) THEN NULL
                    WHEN g % 2 = 0 THEN TIMESTAMPTZ '{NOW.isoformat()}'
                                        - make_interval(days => 400 + g % 300, secs => g % 977)
                    ELSE TIMESTAMPTZ '{NOW.isoformat()}' - make_interval(days => g % 300) END,
               CASE WHEN g % 3 = 0 THEN NULL
                    ELSE TIMESTAMPTZ '{NOW.isoformat()}' - make_interval(days => g % 1500) END,
               NULL,
               repeat('x', g % 40)
        FROM generate_series(1, {rows}) AS g;
        CREATE INDEX visits_created ON visits (created_at, id);
        ANALYZE visits
        """
    )


@pytest.fixture
async def visits(
    sql_url: str, connectors: Connectors, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Visits]:
    """A fresh schema (no table yet) and an activity environment on the eu queue."""
    monkeypatch.setenv("LETHE_TEST_SWEEP_URL", sql_url)
    schema = f"lethe_sweep_{uuid.uuid4().hex[:10]}"
    engine = create_async_engine(sql_url)
    env = region_env()
    beats: list[Any] = []
    env.on_heartbeat = lambda *details: beats.extend(details)
    made = Visits(engine, schema, env, connectors, beats)
    async with engine.begin() as conn:
        await conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield made
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        await engine.dispose()


async def test_exactly_the_expired_rows_outside_holds_go(visits: Visits) -> None:
    await seeded(visits, ROWS)
    assert await visits.scalar(f"SELECT count(*) FROM visits WHERE {EXPIRED}") == 99_800
    await visits.snapshot(f"{EXPIRED} AND NOT ({HELD_TENANT}) AND NOT ({HELD_SUBJECT})")
    holds = [hold("tenant", "st-luke", "hold-tenant"), subject_hold("p-124")]
    task = visits.task()

    # The dry run counts, in one call, and touches nothing.
    dry = await visits.sweep(sweep_batch(task, NOW, batch_size=SIZE, holds=holds, dry_run=True))
    assert (dry.removed, dry.held, dry.undated, dry.done) == (97_796, 2_004, 400, True)
    assert len(dry.samples) == 3
    assert await visits.scalar("SELECT count(*) FROM visits") == ROWS
    assert await visits.mismatches() == (97_796, 0)  # every due row is still there

    results = await visits.sweep_all(task, holds=holds)
    assert totals(results) == (97_796, 2_004, 400)
    assert await visits.mismatches() == (0, 0)
    assert len(results) == 20 and all(r.removed <= SIZE for r in results)
    assert results[0].undated == 400 and all(r.undated == 0 for r in results[1:])
    # Oldest first, batch after batch; each committed batch heartbeated where it ended.
    dated = [(r.first, r.last) for r in results if r.removed]
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(dated))  # type: ignore[operator]
    ends = [beat["result"]["cursor"] for beat in visits.beats]
    assert ends == [r.cursor for r in results]

    again = await visits.sweep_all(task, holds=holds)
    assert totals(again) == (0, 2_004, 400)
    assert await visits.mismatches() == (0, 0)


async def test_without_holds_one_statement_a_batch_removes_every_expired_row(
    visits: Visits,
) -> None:
    await seeded(visits, 40_000)
    await visits.snapshot(EXPIRED)
    results = await visits.sweep_all(visits.task())
    assert totals(results) == (19_960, 0, 80)
    assert await visits.mismatches() == (0, 0)


async def test_a_retried_batch_removes_nothing_twice(visits: Visits) -> None:
    await seeded(visits, 20_000)
    task = visits.task()
    first = await visits.sweep(sweep_batch(task, NOW, batch_size=1000, run_id="r"))
    second_batch = sweep_batch(task, NOW, cursor=first.cursor, batch_size=1000, run_id="r")
    second = await visits.sweep(second_batch)
    left = await visits.scalar("SELECT count(*) FROM visits")
    assert left == 20_000 - 2000

    # The worker was lost after the commit; the retry finds the batch's heartbeat and returns
    # what that batch did, touching nothing.
    visits.env.info = dataclasses.replace(
        visits.env.info, attempt=2, heartbeat_details=[visits.beats[-1]]
    )
    retried = await visits.sweep(second_batch)
    assert retried == second
    assert await visits.scalar("SELECT count(*) FROM visits") == left

    # The heartbeat never arrived: the retry takes the next rows, never the same ones again,
    # and never a row that is not due; it says that an earlier attempt may have removed rows
    # no count includes.
    visits.env.info = dataclasses.replace(visits.env.info, heartbeat_details=[])
    await visits.snapshot(EXPIRED)
    blind = await visits.sweep(second_batch)
    assert blind.removed == 1000
    assert "left no record: up to 1000 row(s) it may have removed are not counted" in blind.detail
    assert await visits.scalar("SELECT count(*) FROM visits") == left - 1000
    assert (
        await visits.scalar(
            "SELECT count(*) FROM snapshot s LEFT JOIN visits v ON v.id = s.id "
            "WHERE v.id IS NULL AND NOT s.gone"
        )
        == 0
    )
    assert blind.first is not None and second.last is not None and blind.first >= second.last


async def test_obligations_keep_their_rows(visits: Visits) -> None:
    await seeded(visits, 10_000)
    # closed_at: null for every third row, else 0-1499 days before NOW; kept for two years.
    ended = f"closed_at < TIMESTAMPTZ '{(NOW - 2 * YEAR).isoformat()}'"
    await visits.snapshot(f"{EXPIRED} AND {ended}")
    undated = await visits.scalar(
        f"SELECT count(*) FROM visits WHERE {UNDATED} OR ({EXPIRED} AND closed_at IS NULL)"
    )
    task = visits.task(obligations=[term("obligation", 2 * YEAR, "closed")])
    results = await visits.sweep_all(task, size=700)
    removed = await visits.scalar("SELECT count(*) FROM snapshot WHERE gone")
    assert 0 < removed < 4_990
    assert totals(results) == (removed, 0, undated)
    assert await visits.mismatches() == (0, 0)


async def test_soft_delete_marks_the_expired_rows_once(visits: Visits) -> None:
    await seeded(visits, 10_000)
    await visits.snapshot("false")
    task = visits.task(limit=term(action="soft_delete"))
    assert totals(await visits.sweep_all(task, size=1_000)) == (4_990, 0, 20)
    marked = await visits.scalar(
        f"SELECT count(*) FROM visits WHERE deleted_at = TIMESTAMPTZ '{NOW.isoformat()}'"
    )
    assert marked == 4_990
    assert (
        await visits.scalar(
            f"SELECT count(*) FROM visits WHERE ({EXPIRED}) <> (deleted_at IS NOT NULL)"
        )
        == 0
    )
    # Only the mark changed.
    await visits.run("UPDATE visits SET deleted_at = NULL")
    assert await visits.mismatches() == (0, 0)
    await visits.run(
        f"UPDATE visits SET deleted_at = TIMESTAMPTZ '{NOW.isoformat()}' WHERE {EXPIRED}"
    )
    assert totals(await visits.sweep_all(task)) == (0, 0, 20)


@pytest.mark.parametrize(
    ("match", "gone"),
    [
        (ScopeMatch(key="tenant", field="tenant", values=["st-luke"]), "tenant = 'st-luke'"),
        (ScopeMatch(key="tenant", field="tenant", others=["st-luke"]), "tenant <> 'st-luke'"),
        (ScopeMatch(key="tenant", field="tenant", null=True), "tenant IS NULL"),
    ],
)
async def test_scope_matches_narrow_the_sweep(visits: Visits, match: ScopeMatch, gone: str) -> None:
    await seeded(visits, 10_000)
    await visits.run("UPDATE visits SET tenant = NULL WHERE id % 7 = 0")
    await visits.snapshot(f"{EXPIRED} AND coalesce({gone}, false)")
    assert 0 < await visits.scalar("SELECT count(*) FROM snapshot WHERE gone") < 4_990
    await visits.sweep_all(visits.task(scope=[match]), size=1_000)
    assert await visits.mismatches() == (0, 0)


@pytest.mark.parametrize(
    ("created", "problem"),
    [
        ("created_on", r"table 'lethe_sweep_\w+\.visits' has no column 'created_on'"),
        ("summary", r"column 'summary' of table 'lethe_sweep_\w+\.visits' .*is TEXT, not a date"),
    ],
)
async def test_a_bad_date_column_is_refused_and_nothing_goes(
    visits: Visits, created: str, problem: str
) -> None:
    await seeded(visits, 1_000)
    await visits.snapshot("false")
    locator = visits_locator(table=f"{visits.schema}.visits", retention={"created": created})
    batch = sweep_batch(visits.task(locator=locator), NOW)
    with pytest.raises(ApplicationError) as raised:
        await visits.sweep(batch)
    assert raised.value.type == "SchemaMismatch" and raised.value.non_retryable
    assert "system 'patients-db'" in str(raised.value)
    assert re.search(problem, str(raised.value))
    assert await visits.mismatches() == (0, 0)


def test_the_fixture_periods_are_clear_of_the_limit() -> None:
    # Expired rows are 400 days old or more, the others 299 or less: the limit is a year.
    assert timedelta(days=299) < YEAR < timedelta(days=400)


async def test_a_batch_told_but_rolled_back_is_done_again_by_its_retry(
    visits: Visits, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch's record leaves before its commit; the commit fails (the worker is lost), so
    the rows are back: the retry finds its range full, and removes and counts them again."""
    await seeded(visits, 10_000)
    task = visits.task()
    batch = sweep_batch(task, NOW, batch_size=1000, run_id="r")
    real_commit = AsyncConnection.commit

    async def lost(self: AsyncConnection) -> None:
        raise ConnectionResetError("the worker is lost at the commit")

    monkeypatch.setattr(AsyncConnection, "commit", lost)
    with pytest.raises(Exception, match=r"lost at the commit|did not answer"):
        await visits.sweep(batch)
    monkeypatch.setattr(AsyncConnection, "commit", real_commit)
    told = visits.beats[-1]
    assert told["from"] is None and told["to"] is not None and told["result"]["removed"] == 1000
    assert await visits.scalar("SELECT count(*) FROM visits") == 10_000  # rolled back

    visits.env.info = dataclasses.replace(visits.env.info, attempt=2, heartbeat_details=[told])
    again = await visits.sweep(batch)
    assert again.removed == 1000 and "no record" not in again.detail
    assert await visits.scalar("SELECT count(*) FROM visits") == 9_000
