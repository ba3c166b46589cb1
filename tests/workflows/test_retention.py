"""The retention sweep workflow under time skipping, with the real activities on SQLite.

A table of portal sessions, dated by their last activity, swept under a 90-day limit: the sweep
continues as new and still removes exactly the expired rows once each; a legal hold placed
after the first batch is respected from the next; a system that does not answer fails its own
task after the retry span (skipped time) while the others finish. The database is read back
with SQL: the workflow's own counts are checked against it, not trusted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, insert, select
from sqlalchemy.ext.asyncio import create_async_engine
from temporalio import activity
from temporalio.client import ScheduleBackfill, ScheduleOverlapPolicy
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from lethe.activities import ledger as control
from lethe.activities import retention
from lethe.activities.clients import Clients
from lethe.activities.connectors import Connectors
from lethe.contracts import SweepBatch, SweepReport, SweepRequest, SweepResult
from lethe.evidence import holds, ledger
from lethe.evidence.store import engine_for
from lethe.kernel.config import Settings, current_settings
from lethe.kernel.database import dispose_all
from lethe.kernel.subjects import subject_ref
from lethe.sdk import retention as sweeps
from lethe.workflows.retention import RetentionSweepWorkflow

CONTROL = "sweeptest-control"
REGION_QUEUE = "sweeptest-eu"
TENANT = "st-mary"
LIMIT = timedelta(days=90)

DATAMAP = """
version: 1
regions: [eu]
tenants:
  st-mary: {region: eu}
systems:
  - name: sessions-db
    kind: sql
    region: eu
    connection: LETHE_TEST_SESSIONS_URL
    tables:
      - table: sessions
        subject_column: patient_id
        columns:
          ip_address: user.device.ip_address
        retention: {last_activity: last_seen_at}
"""
UNREACHABLE = """
  - name: old-sessions-db
    kind: sql
    region: eu
    connection: LETHE_TEST_UNREACHABLE_URL
    tables:
      - table: sessions
        subject_column: patient_id
        columns:
          ip_address: user.device.ip_address
        retention: {last_activity: last_seen_at}
"""
PACK = """
name: sweeptest
version: "1"
erasure:
  default: {strategy: delete, citation: "GDPR Art. 17(1)"}
  deadline_months: 1
  window: 30d
retention:
  - id: device.storage-limit
    category: user.device
    kind: limit
    period: 90d
    trigger: last_activity
    action: delete
    citation: "GDPR Art. 5(1)(e)"
"""

sessions = Table(
    "sessions",
    MetaData(),
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("patient_id", String(64), nullable=False),
    Column("ip_address", String(45), nullable=False),
    Column("last_seen_at", DateTime(timezone=True)),
)


def _rows(count: int, now: datetime) -> list[dict[str, Any]]:
    """Sessions of ten patients, one a day going back `count` days from `now` (the test
    server's clock, which earlier tests may have moved on), ids 1.. from the oldest."""
    return [
        {
            "id": n + 1,
            "patient_id": f"p-{n % 10}",
            "ip_address": f"192.0.2.{n % 250 + 1}",
            "last_seen_at": now - timedelta(days=count - n, hours=1),
        }
        for n in range(count)
    ]


def _due(rows: list[dict[str, Any]], now: datetime) -> list[dict[str, Any]]:
    """The rows past the limit at `now`, oldest first (the sweep's order)."""
    return [row for row in rows if row["last_seen_at"] < now - LIMIT]


@pytest.fixture
async def setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Settings, str]]:
    """A sessions database and a Lethe store of this test's own; the data map and pack."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'sessions.db'}"
    (tmp_path / "datamap.yaml").write_text(DATAMAP)
    (tmp_path / "pack.yaml").write_text(PACK)
    monkeypatch.setenv("LETHE_TEST_SESSIONS_URL", url)
    monkeypatch.setenv("LETHE_TEST_UNREACHABLE_URL", "postgresql+psycopg://lethe@127.0.0.1:9/x")
    monkeypatch.setenv("LETHE_STORE_URL", f"sqlite+aiosqlite:///{tmp_path / 'lethe.db'}")
    monkeypatch.setenv("LETHE_DATAMAP", str(tmp_path / "datamap.yaml"))
    monkeypatch.setenv("LETHE_POLICY", str(tmp_path / "pack.yaml"))
    monkeypatch.setenv("LETHE_SUBJECT_KEY", base64.b64encode(os.urandom(32)).decode())
    monkeypatch.setenv("LETHE_KEYS_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())
    monkeypatch.setenv("LETHE_CONTROL_QUEUE", CONTROL)
    yield current_settings(), url
    await dispose_all()


async def _seed(url: str, rows: list[dict[str, Any]]) -> None:
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(sessions.metadata.create_all)
        await conn.execute(insert(sessions), rows)
    await engine.dispose()


async def _left(url: str) -> set[int]:
    engine = create_async_engine(url)
    async with engine.connect() as conn:
        ids = {row.id for row in await conn.execute(select(sessions.c.id))}
    await engine.dispose()
    return ids


SweepActivity = Callable[[SweepBatch], Awaitable[SweepResult]]


@contextlib.asynccontextmanager
async def _running(
    env: WorkflowEnvironment, wrap: Callable[[SweepActivity], SweepActivity] | None = None
) -> AsyncIterator[None]:
    """A control worker and region eu's worker over clients of their own; `wrap` puts an
    activity around the real `sql.sweep` in its place."""
    async with Clients() as clients:
        connectors = Connectors(clients)
        regional = list(connectors.activities())
        if wrap is not None:
            real = connectors.activity("sql.sweep")
            regional = [a for a in regional if a is not real] + [wrap(real)]
        control_worker = Worker(
            env.client,
            task_queue=CONTROL,
            workflows=[RetentionSweepWorkflow],
            activities=[
                retention.plan,
                retention.next_batch,
                retention.keep_report,
                control.record,
            ],
        )
        async with control_worker, Worker(env.client, task_queue=REGION_QUEUE, activities=regional):
            yield


async def _sweep(
    env: WorkflowEnvironment, settings: Settings, request: SweepRequest
) -> SweepReport:
    run_id = await sweeps.start_sweep(env.client, settings, request)
    return await sweeps.follow(env.client, run_id)


async def _runs(env: WorkflowEnvironment, workflow_id: str) -> int:
    """How many runs the workflow took: from the last run back through each one it continued."""
    runs, run_id = 0, None
    while True:
        history = await env.client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        runs += 1
        started = history.events[0].workflow_execution_started_event_attributes
        if not started.continued_execution_run_id:
            return runs
        run_id = started.continued_execution_run_id


@pytest.mark.timeout(180)
async def test_a_long_sweep_continues_as_new_and_removes_each_expired_row_once(
    time_skipping_env: WorkflowEnvironment, setup: tuple[Settings, str]
) -> None:
    settings, url = setup
    now = await time_skipping_env.get_current_time()
    rows = _rows(300, now)
    await _seed(url, rows)
    request = SweepRequest(requested_by="dpo", batch_size=20, batches_per_run=3)
    async with _running(time_skipping_env):
        report = await _sweep(time_skipping_env, settings, request)
        runs = await _runs(time_skipping_env, report.run_id)

    due = {row["id"] for row in _due(rows, now)}
    assert len(due) == 211  # 90 to 300 days back (a day and an hour beyond the limit's edge)
    assert await _left(url) == {row["id"] for row in rows} - due
    (task,) = report.tasks
    assert (task.status, task.removed, task.held, task.undated) == ("done", len(due), 0, 0)
    assert task.rules == ["device.storage-limit"]
    assert task.batches >= 11  # 211 rows in batches of 20
    assert runs >= 3  # three batches a run: continued as new at least twice
    store = await engine_for(settings.store_url.get_secret_value())
    entries = [e for e in await ledger.entries(store) if e.request_id == report.run_id]
    actions = [e.action for e in entries]
    assert actions.count("retention.started") == 1 and actions[-1] == "retention.finished"
    batches = [e for e in entries if e.action == "retention.batch"]
    assert sum(int(e.details["removed"] or 0) for e in batches) == len(due)
    assert all(e.details["rule"] == "device.storage-limit" for e in batches)
    assert all(e.subject_ref == "-" for e in entries)
    kept = await sweeps.report(time_skipping_env.client, settings, report.run_id)
    assert kept == report

    again = await _sweep_again(time_skipping_env, settings, request)
    assert again.removed == 0 and await _left(url) == {row["id"] for row in rows} - due


async def _sweep_again(
    env: WorkflowEnvironment, settings: Settings, request: SweepRequest
) -> SweepReport:
    async with _running(env):
        return await _sweep(env, settings, request)


@pytest.mark.timeout(180)
async def test_a_hold_placed_after_the_first_batch_is_respected_from_the_next(
    time_skipping_env: WorkflowEnvironment, setup: tuple[Settings, str]
) -> None:
    settings, url = setup
    now = await time_skipping_env.get_current_time()
    rows = _rows(200, now)
    await _seed(url, rows)
    held_patient = "p-3"
    ref = subject_ref(TENANT, held_patient, settings.subject_key_bytes)
    calls: list[SweepBatch] = []

    def then_hold(real: SweepActivity) -> SweepActivity:
        @activity.defn(name="sql.sweep")
        async def sweep_then_hold(batch: SweepBatch) -> SweepResult:
            """The real sweep; after its first batch, a DPO places a hold on one patient."""
            result = await real(batch)
            calls.append(batch)
            if len(calls) == 1:
                store = await engine_for(settings.store_url.get_secret_value())
                await holds.place(
                    store,
                    matter="claim-7",
                    scope="subject",
                    value=ref,
                    placed_by="dpo",
                    reason="pending claim",
                )
            return result

        return sweep_then_hold

    async with _running(time_skipping_env, then_hold):
        report = await _sweep(
            time_skipping_env, settings, SweepRequest(requested_by="dpo", batch_size=25)
        )

    assert calls[0].holds == [] and all(len(batch.holds) == 1 for batch in calls[1:])
    due = _due(rows, now)
    first_batch = {row["id"] for row in due[:25]}
    kept_for_hold = {row["id"] for row in due[25:] if row["patient_id"] == held_patient}
    assert kept_for_hold  # the hold keeps rows the later batches would have removed
    expected = {row["id"] for row in rows} - {row["id"] for row in due} | kept_for_hold
    assert await _left(url) == expected
    (task,) = report.tasks
    assert task.removed == len(due) - len(kept_for_hold)
    assert task.held == len(kept_for_hold)
    assert first_batch.isdisjoint(await _left(url))  # before the hold: removed, held or not


@pytest.mark.timeout(180)
async def test_a_system_that_does_not_answer_fails_its_task_and_the_others_finish(
    local_env: WorkflowEnvironment, setup: tuple[Settings, str]
) -> None:
    """On the dev server: the test server does not skip the backoff between an activity's
    attempts (and its history long poll gives up meanwhile)."""
    settings, url = setup
    now = await local_env.get_current_time()
    rows = _rows(120, now)
    await _seed(url, rows)
    await asyncio.to_thread(Path(os.environ["LETHE_DATAMAP"]).write_text, DATAMAP + UNREACHABLE)
    async with _running(local_env):
        request = SweepRequest(requested_by="dpo", retry_span=timedelta(seconds=4))
        report = await _sweep(local_env, settings, request)

    by_id = {task.task_id: task for task in report.tasks}
    assert by_id["sessions-db/0"].status == "done"
    assert by_id["sessions-db/0"].removed == len(_due(rows, now))
    failed = by_id["old-sessions-db/0"]
    assert failed.status == "failed" and failed.removed == 0
    assert "did not answer" in failed.detail or "timed out" in failed.detail, failed.detail
    assert "lethe@" not in failed.detail  # the connection's user is not in the report
    assert report.finished_at is not None


@pytest.mark.timeout(180)
async def test_a_schedule_sweeps_month_after_month_each_as_of_its_time(
    local_env: WorkflowEnvironment, setup: tuple[Settings, str]
) -> None:
    """Six monthly sweeps over half a year, run by the Schedule's backfill on the dev server
    (the time-skipping server has no Schedules): each judges as of its scheduled time, so each
    removes exactly the rows that expired in its month."""
    settings, url = setup
    now = await local_env.get_current_time()
    rows = _rows(365, now)
    await _seed(url, rows)
    every = timedelta(days=30)
    request = SweepRequest(requested_by="schedule-test", batch_size=50)
    async with _running(local_env):
        schedule_id, created, upcoming = await sweeps.schedule_sweeps(
            local_env.client, settings, every, request
        )
        schedule = local_env.client.get_schedule_handle(schedule_id)
        try:
            assert created and schedule_id == f"lethe-retention-{CONTROL}"
            assert upcoming and upcoming[0] > now
            await schedule.backfill(
                ScheduleBackfill(
                    start_at=now - 6 * every,
                    end_at=now,
                    overlap=ScheduleOverlapPolicy.BUFFER_ALL,
                )
            )
            reports: list[SweepReport] = []
            for _ in range(600):
                reports = await sweeps.recent(settings)
                if len(reports) == 6:
                    break
                await asyncio.sleep(0.1)
        finally:
            await schedule.delete()

    assert len(reports) == 6, [r.run_id for r in reports]
    reports.sort(key=lambda report: report.as_of)
    epoch = datetime(1970, 1, 1, tzinfo=now.tzinfo)
    assert all((r.as_of - epoch) % every == timedelta(0) for r in reports)  # the nominal times
    assert all(r.as_of < r.started_at for r in reports)  # backfilled: judged as of the past
    assert all(r.run_id.startswith(schedule_id) for r in reports)
    removed_before = 0
    for report in reports:
        due = len(_due(rows, report.as_of))
        assert report.removed == due - removed_before, report.as_of
        removed_before = due
    assert await _left(url) == {r["id"] for r in rows} - {
        r["id"] for r in _due(rows, reports[-1].as_of)
    }


CONFLICTING = """
  - id: device.created-limit
    category: user.device.ip_address
    kind: limit
    period: 30d
    trigger: created
    action: delete
    citation: "a second limit, counted from another date"
"""


@pytest.mark.timeout(120)
async def test_a_pack_conflict_fails_the_sweep_before_anything_and_status_says_why(
    local_env: WorkflowEnvironment, setup: tuple[Settings, str]
) -> None:
    settings, url = setup
    now = await local_env.get_current_time()
    rows = _rows(120, now)
    await _seed(url, rows)
    datamap = DATAMAP.replace(
        "columns:\n", "columns:\n          device_id: user.device.device_id\n"
    )
    await asyncio.to_thread(Path(os.environ["LETHE_DATAMAP"]).write_text, datamap)
    await asyncio.to_thread(Path(os.environ["LETHE_POLICY"]).write_text, PACK + CONFLICTING)
    async with _running(local_env):
        run_id = await sweeps.start_sweep(
            local_env.client, settings, SweepRequest(requested_by="dpo")
        )
        with pytest.raises(sweeps.SweepFailed) as failed:
            await sweeps.follow(local_env.client, run_id)
    message = str(failed.value)
    assert "PolicyConflict" in message
    assert "'device.created-limit'" in message and "'device.storage-limit'" in message
    assert await _left(url) == {row["id"] for row in rows}  # nothing touched
    ended: list[sweeps.EndedSweep] = []
    for _ in range(100):
        ended = await sweeps.ended_without_report(local_env.client, CONTROL)
        if any(sweep.run_id == run_id for sweep in ended):
            break
        await asyncio.sleep(0.1)
    (mine,) = [sweep for sweep in ended if sweep.run_id == run_id]
    assert mine.status == "failed" and "PolicyConflict" in mine.reason
