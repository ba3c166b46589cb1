"""Retention sweeps end to end: the `lethe retention` commands and worker processes on the stack.

Each deployment is a test's own: a sessions table on the stack's PostgreSQL (the even ids last
seen more than 90 days ago, the odd ones within them), a Lethe store database, a control queue
(its region `eu` polls `<prefix>eu`), and the data map and pack below, which the commands and
`worker.py --region eu --control` (a process) read through LETHE_DATAMAP and LETHE_POLICY. What
the commands say is checked against the table itself (an md5 of every row's text before and
after), the ledger (read from the store with `lethe.evidence.ledger`) and the Temporal server
(the Schedule, the workflow's history).

Crashes: a worker SIGKILLed while a batch's DELETE waits on a row the test has locked (so the
kill lands inside a batch, every time), and a worker that ends right after a batch committed,
before Temporal heard of it (tests/e2e/crash_after_effect.py around `sweep_table`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from string import Template

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client as TemporalClient
from temporalio.client import ScheduleActionStartWorkflow, ScheduleOverlapPolicy

from lethe.contracts import LedgerEntry, SweepReport
from lethe.evidence import ledger
from lethe.sdk import retention as sweeps
from tests.conftest import stack_variable
from tests.e2e.conftest import CliResult, WorkerProcess, run_lethe
from tests.e2e.crash_after_effect import CRASH_AFTER, EXIT_CODE, MARKER

REGION = "eu"
RULE = "device.storage-limit"
TASK = "sessions-db/0"
DATAMAP = Template("""
version: 1
regions: [eu]
tenants:
  ${tenant}: {region: eu}
systems:
  - name: sessions-db
    kind: sql
    region: eu
    connection: LETHE_STACK_SQL_URL
    tables:
      - table: ${table}
        subject_column: patient_id
        columns:
          ip_address: user.device.ip_address
        retention: {last_activity: last_seen_at}
""")
PACK = f"""
name: e2e-retention
version: "test"
erasure:
  default: {{strategy: delete, citation: "GDPR Art. 17(1)"}}
  deadline_months: 1
  window: 30d
retention:
  - id: {RULE}
    category: user.device
    kind: limit
    period: 90d
    trigger: last_activity
    action: delete
    citation: "GDPR Art. 5(1)(e)"
"""
CRASH_SCRIPT = "tests/e2e/crash_after_effect.py"
SWEEP_TABLE = "lethe.activities.sql_retention:sweep_table"
"""The function that runs (and commits) one batch; the dying worker ends once it returned."""
RECOVERY_TIMEOUT = 150.0
"""From the new worker's start until the sweep closes: the killed batch is retried only after
its heartbeat timeout (20 seconds), later when the machine is busy."""


@dataclass
class Deployment:
    """One test's sessions table, Lethe store, control queue, data map, pack and workers."""

    suffix: str
    workdir: Path
    temporal: TemporalClient
    sql_url: str
    """The stack's PostgreSQL database holding the table (SQLAlchemy URL)."""
    store_url: str
    workers: list[WorkerProcess] = field(default_factory=list)

    @property
    def table(self) -> str:
        """The sessions table."""
        return f"rs_{self.suffix}_sessions"

    @property
    def control_queue(self) -> str:
        """The control queue; the region's queue is `rs-<suffix>-eu`."""
        return f"rs-{self.suffix}-control"

    @property
    def patient_prefix(self) -> str:
        """What every subject id of the table starts with."""
        return f"pt-{self.suffix}-"

    @property
    def dsn(self) -> str:
        """The table's database for psycopg."""
        return _dsn(self.sql_url)

    @property
    def env(self) -> dict[str, str]:
        """The environment of the deployment's commands and workers."""
        return {
            **os.environ,
            "LETHE_DATAMAP": str(self.workdir / "datamap.yaml"),
            "LETHE_POLICY": str(self.workdir / "pack.yaml"),
            "LETHE_CONTROL_QUEUE": self.control_queue,
            "LETHE_STORE_URL": self.store_url,
            "LETHE_WORKER_SHUTDOWN_GRACE_SECONDS": "5",
            "PYTHONUNBUFFERED": "1",
            "COLUMNS": "200",
        }

    async def lethe(self, *args: str, timeout: float = 120) -> CliResult:
        """Run `lethe ARGS` in the deployment's environment."""
        return await run_lethe(self.env, *args, timeout=timeout)

    def worker(self, script: str | None = None, **env: str) -> WorkerProcess:
        """A worker process for region `eu` and the control queue (not started)."""
        log = self.workdir / f"worker-{len(self.workers) + 1}.log"
        found = WorkerProcess(REGION, {**self.env, **env}, log)
        if script is not None:
            found.script = script
        self.workers.append(found)
        return found

    async def seed(self, first: int, count: int, dated: str = "half") -> None:
        """Rows `first` .. `first + count - 1`, ten patients' worth of ids per ip address.
        `half`: the even ids last seen 91 to 390 days ago, the odd ones within 89 days;
        `expired`: all 91 days or more ago; `undated`: no last activity. A day's margin either
        side of the limit, so the clock moving on during a test changes no row's fate."""
        seen = {
            "half": "CASE WHEN n % 2 = 0 THEN {expired} ELSE {recent} END",
            "expired": "{expired}",
            "undated": "NULL",
        }[dated].format(
            expired="now() - make_interval(days => 91 + n % 300, secs => n % 86400)",
            recent="now() - make_interval(days => n % 89, secs => n % 86400)",
        )
        statement = sql.SQL(
            "INSERT INTO {table} (id, patient_id, ip_address, last_seen_at) "
            "SELECT n, {patient} || (n % 997), '192.0.2.' || (n % 250 + 1), " + seen + " "
            "FROM generate_series({first}, {last}) AS n"
        ).format(
            table=sql.Identifier(self.table),
            patient=sql.Literal(self.patient_prefix),
            first=sql.Literal(first),
            last=sql.Literal(first + count - 1),
        )
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await conn.execute(statement)
            await conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(self.table)))

    async def rows(self) -> dict[int, str]:
        """Every row's id and the md5 of the row's text."""
        query = sql.SQL("SELECT id, md5(s::text) FROM {} AS s").format(sql.Identifier(self.table))
        async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
            return dict(await (await conn.execute(query)).fetchall())

    async def expired(self) -> set[int]:
        """The ids of the rows last seen more than 90 days ago."""
        query = sql.SQL("SELECT id FROM {} WHERE last_seen_at < now() - interval '90 days'").format(
            sql.Identifier(self.table)
        )
        async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
            return {row[0] for row in await (await conn.execute(query)).fetchall()}

    async def ledger(self, run_id: str) -> list[LedgerEntry]:
        """The run's ledger entries, in chain order, read from the store."""
        engine = create_async_engine(self.store_url)
        try:
            return await ledger.entries(engine, run_id)
        finally:
            await engine.dispose()

    async def progress(self, run_id: str) -> SweepReport | None:
        """The running sweep's report so far (the workflow's progress query)."""
        return await sweeps.sweep_progress(self.temporal, run_id)


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextlib.asynccontextmanager
async def _deployment(
    tmp_path_factory: pytest.TempPathFactory, temporal: TemporalClient
) -> AsyncIterator[Deployment]:
    """A deployment of its own: table, store database, data map and pack; all removed after."""
    suffix = uuid.uuid4().hex[:8]
    shared_store = make_url(stack_variable("LETHE_STORE_URL"))
    database = f"lethe_rs_{suffix}"
    admin = _dsn(shared_store.set(database="postgres").render_as_string(hide_password=False))
    found = Deployment(
        suffix=suffix,
        workdir=tmp_path_factory.mktemp(f"retention-{suffix}"),
        temporal=temporal,
        sql_url=stack_variable("LETHE_STACK_SQL_URL"),
        store_url=shared_store.set(database=database).render_as_string(hide_password=False),
    )
    tenant = f"st-mary-{suffix}"
    (found.workdir / "datamap.yaml").write_text(
        DATAMAP.substitute(tenant=tenant, table=found.table)
    )
    (found.workdir / "pack.yaml").write_text(PACK)
    table = sql.Identifier(found.table)
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
        await conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    try:
        async with await psycopg.AsyncConnection.connect(found.dsn, autocommit=True) as conn:
            await conn.execute(
                sql.SQL(
                    "CREATE TABLE {} (id integer PRIMARY KEY, patient_id varchar(64) NOT NULL, "
                    "ip_address varchar(45) NOT NULL, last_seen_at timestamptz)"
                ).format(table)
            )
            await conn.execute(sql.SQL("CREATE INDEX ON {} (last_seen_at, id)").format(table))
        yield found
    finally:
        for worker in found.workers:
            await worker.stop()
        running = f"TaskQueue = '{found.control_queue}' AND ExecutionStatus = 'Running'"
        async for execution in temporal.list_workflows(running):
            await temporal.get_workflow_handle(execution.id).terminate(reason="test ended")
        async with await psycopg.AsyncConnection.connect(found.dsn, autocommit=True) as conn:
            await conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
        async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
            await conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database))
            )


@pytest.fixture(scope="module")
async def small(
    tmp_path_factory: pytest.TempPathFactory, stack_temporal: TemporalClient
) -> AsyncIterator[Deployment]:
    """4,000 sessions (2,000 past the limit) and 8 undated ones, with a running worker."""
    async with _deployment(tmp_path_factory, stack_temporal) as deployment:
        await deployment.seed(1, 4000)
        await deployment.seed(4001, 8, dated="undated")
        await deployment.worker().start()
        yield deployment


@pytest.fixture
async def deployment(
    tmp_path_factory: pytest.TempPathFactory, stack_temporal: TemporalClient
) -> AsyncIterator[Deployment]:
    """An empty sessions table and no worker yet."""
    async with _deployment(tmp_path_factory, stack_temporal) as found:
        yield found


def _started(result: CliResult) -> str:
    """The run id `lethe retention run|plan` says it started."""
    line = next(line for line in result.stderr.splitlines() if line.startswith("started "))
    return line.split()[1]


def _assert_no_personal_data(deployment: Deployment, entries: list[LedgerEntry]) -> None:
    """No subject id, no ip address, no subject reference in any entry."""
    for entry in entries:
        assert entry.subject_ref == "-", entry
        said = json.dumps(entry.details) + (entry.system or "") + entry.actor
        assert deployment.patient_prefix not in said, entry
        assert "192.0.2." not in said, entry


def _batches(entries: list[LedgerEntry]) -> list[LedgerEntry]:
    return [entry for entry in entries if entry.action == "retention.batch"]


def _removed(entries: list[LedgerEntry]) -> int:
    """What the ledger's batch entries say was removed."""
    return sum(int(entry.details["removed"] or 0) for entry in _batches(entries))


@contextlib.asynccontextmanager
async def _locked(deployment: Deployment, row: int) -> AsyncIterator[psycopg.AsyncConnection]:
    """Hold row `row` FOR UPDATE until the block ends (then roll back)."""
    query = sql.SQL("SELECT id FROM {} WHERE id = %s FOR UPDATE").format(
        sql.Identifier(deployment.table)
    )
    async with await psycopg.AsyncConnection.connect(deployment.dsn) as conn:
        assert await (await conn.execute(query, (row,))).fetchall() == [(row,)]
        yield conn
        await conn.rollback()


async def _sweep_statements(deployment: Deployment, waiting: bool = False) -> list[int]:
    """The backends running a statement on the table other than ours (`waiting`: on a lock)."""
    query = (
        "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND state = 'active' "
        "AND query ILIKE %s" + (" AND wait_event_type = 'Lock'" if waiting else "")
    )
    async with await psycopg.AsyncConnection.connect(deployment.dsn, autocommit=True) as conn:
        rows = await (await conn.execute(query, (f"%{deployment.table}%",))).fetchall()
    return [row[0] for row in rows]


async def _no_sweep_statements(deployment: Deployment) -> bool:
    return not await _sweep_statements(deployment)


async def _until(check: Callable[[], Awaitable[object]], timeout: float) -> None:
    """Wait until `check()` gives something true; fail the test after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return
            await asyncio.sleep(0.05)


async def _walk(deployment: Deployment, count: int, offset: int = 0) -> list[int]:
    """The ids of `count` expired rows from `offset` (0-based) in the sweep's order (date, id)."""
    query = sql.SQL(
        "SELECT id FROM {} WHERE last_seen_at < now() - interval '90 days' "
        "ORDER BY last_seen_at, id OFFSET %s LIMIT %s"
    ).format(sql.Identifier(deployment.table))
    async with await psycopg.AsyncConnection.connect(deployment.dsn) as conn:
        rows = await (await conn.execute(query, (offset, count))).fetchall()
    assert len(rows) == count
    return [int(row[0]) for row in rows]


async def _attempts(deployment: Deployment, run_id: str) -> dict[str, int]:
    """Activity id -> the attempt of it that completed, from the workflow's history."""
    history = await deployment.temporal.get_workflow_handle(run_id).fetch_history()
    scheduled: dict[int, str] = {}
    attempts: dict[str, int] = {}
    for event in history.events:
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            scheduled[event.event_id] = event.activity_task_scheduled_event_attributes.activity_id
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            started = event.activity_task_started_event_attributes
            attempts[scheduled[started.scheduled_event_id]] = started.attempt
    return attempts


# --- the commands ----------------------------------------------------------------------------


async def test_plan_counts_and_touches_nothing_then_run_removes_exactly_the_expired_rows(
    small: Deployment,
) -> None:
    before = await small.rows()
    expired = await small.expired()
    assert len(before) == 4008 and len(expired) == 2000

    planned = await small.lethe("retention", "plan", "--json", "--by", "dpo")
    assert planned.code == 0, str(planned)
    plan = SweepReport.model_validate(planned.json())
    assert plan.dry_run and plan.finished_at is not None and plan.pack.startswith("e2e-retention")
    (task,) = plan.tasks
    assert (task.task_id, task.status, task.rules) == (TASK, "done", [RULE])
    assert (task.removed, task.held, task.undated) == (2000, 0, 8)
    assert task.action == "delete" and task.citations == {RULE: "GDPR Art. 5(1)(e)"}
    # Sample keys: the surrogate ids of the oldest expired rows, no personal data.
    assert task.samples and {int(sample) for sample in task.samples} <= expired
    assert await small.rows() == before  # the plan touched nothing
    assert await small.ledger(plan.run_id) == []  # and wrote no ledger entry

    ran = await small.lethe(
        "retention", "run", "--wait", "--json", "--batch-size", "300", "--by", "dpo"
    )
    assert ran.code == 0, str(ran)
    report = SweepReport.model_validate(ran.json())
    run_id = report.run_id
    assert _started(ran) == run_id and run_id.startswith("retention-")
    assert not report.dry_run and report.requested_by == "dpo"
    (task,) = report.tasks
    assert (task.status, task.removed, task.held, task.undated) == ("done", 2000, 0, 8)
    assert task.batches == 7  # 6 x 300 and 200

    after = await small.rows()
    assert set(after) == set(before) - expired
    assert all(after[key] == before[key] for key in after)  # the rest, byte for byte
    assert await small.expired() == set()

    status = await small.lethe("retention", "status", "--json")
    assert status.code == 0, str(status)
    listed = status.json()
    assert listed["running"] is None
    recent = {found["run_id"]: found for found in listed["recent"]}
    assert run_id in recent and plan.run_id in recent
    assert SweepReport.model_validate(recent[run_id]) == report
    assert recent[plan.run_id]["dry_run"] is True

    again = await small.lethe("retention", "report", run_id, "--json")
    assert again.code == 0, str(again)
    assert SweepReport.model_validate(again.json()) == report

    entries = await small.ledger(run_id)
    actions = [entry.action for entry in entries]
    assert actions[0] == "retention.started" and actions[-1] == "retention.finished", actions
    assert actions.count("retention.started") == actions.count("retention.finished") == 1
    batches = _batches(entries)
    assert len(batches) == 7 and len(entries) == 9, actions
    assert [entry.details["batch"] for entry in batches] == list(range(1, 8))
    assert [entry.details["removed"] for entry in batches] == [300] * 6 + [200]
    assert _removed(entries) == 2000 == entries[-1].details["removed"]
    assert all(entry.details["rule"] == RULE and entry.system == "sessions-db" for entry in batches)
    assert entries[0].details["pack"] == report.pack and entries[-1].details["undated"] == 8
    _assert_no_personal_data(small, entries)
    verified = await small.lethe("audit", "verify")
    assert verified.code == 0, str(verified)


async def test_a_second_sweep_is_refused_while_one_runs(small: Deployment) -> None:
    """A sweep waits in its second batch on a row the test holds; meanwhile `lethe retention
    status` shows it running and `lethe retention run` is refused, naming it."""
    await small.seed(10_001, 240, dated="expired")
    before = await small.rows()
    expired = await small.expired()
    (blocker,) = await _walk(small, 1, offset=150)
    async with _locked(small, blocker):
        slow = await small.lethe("retention", "run", "--batch-size", "100", "--by", "dpo")
        assert slow.code == 0, str(slow)
        slow_id = _started(slow)
        await _until(lambda: _sweep_statements(small, waiting=True), 60)

        status = await small.lethe("retention", "status", "--json")
        assert status.code == 0, str(status)
        running = SweepReport.model_validate(status.json()["running"])
        assert running.run_id == slow_id and running.finished_at is None
        assert (running.tasks[0].status, running.removed) == ("running", 100)

        refused = await small.lethe("retention", "run", "--by", "dpo")
        assert refused.code == 2, str(refused)
        assert f"retention sweep {slow_id} is running" in refused.stderr, refused.stderr
        assert "started" not in refused.stderr
        # Refused before starting anything: the slow sweep is still the only one.
        query = f"TaskQueue = '{small.control_queue}' AND ExecutionStatus = 'Running'"
        assert [w.id async for w in small.temporal.list_workflows(query)] == [slow_id]

    report = await asyncio.wait_for(sweeps.follow(small.temporal, slow_id), 60)
    assert report.removed == len(expired) and blocker in expired
    after = await small.rows()
    assert set(after) == set(before) - expired
    assert all(after[key] == before[key] for key in after)
    assert _removed(await small.ledger(slow_id)) == len(expired)


async def test_a_plan_for_an_unknown_rule_is_refused_naming_it(small: Deployment) -> None:
    before = await small.rows()
    refused = await small.lethe("retention", "plan", "--rule", "nosuch")
    assert refused.code == 2, str(refused)
    assert "no retention rule 'nosuch'" in refused.stderr, refused.stderr
    assert RULE in refused.stderr  # the rules it has
    assert await small.rows() == before


async def test_schedule_retention_creates_a_daily_schedule(small: Deployment) -> None:
    schedule_id = sweeps.schedule_id(small.control_queue)
    handle = small.temporal.get_schedule_handle(schedule_id)
    try:
        created = await small.lethe("schedule", "retention", "--every", "1d", "--by", "dpo")
        assert created.code == 0, str(created)
        assert f"created schedule {schedule_id}" in created.stderr, created.stderr
        assert "next run" in created.stdout
        described = await handle.describe()
        schedule = described.schedule
        assert [spec.every for spec in schedule.spec.intervals] == [timedelta(days=1)]
        assert schedule.policy.overlap == ScheduleOverlapPolicy.SKIP
        assert schedule.policy.catchup_window == sweeps.DEFAULT_CATCHUP
        action = schedule.action
        assert isinstance(action, ScheduleActionStartWorkflow)
        assert (action.workflow, action.task_queue) == (
            "RetentionSweepWorkflow",
            small.control_queue,
        )
        assert described.info.next_action_times  # a sweep a day from now on

        updated = await small.lethe(
            "schedule", "retention", "--every", "7d", "--catchup", "6h", "--by", "dpo"
        )
        assert updated.code == 0, str(updated)
        assert f"updated schedule {schedule_id}" in updated.stderr, updated.stderr
        schedule = (await handle.describe()).schedule
        assert [spec.every for spec in schedule.spec.intervals] == [timedelta(days=7)]
        assert schedule.policy.catchup_window == timedelta(hours=6)
    finally:
        with contextlib.suppress(Exception):
            await handle.delete()


# --- crashes ---------------------------------------------------------------------------------


ROWS = 200_000
BATCH = 2_000
KILLED_BATCH = 11
"""The batch during which the worker is killed: it waits on a row the test holds locked."""


@pytest.mark.timeout(240)
async def test_a_worker_killed_mid_batch_loses_nothing_and_removes_nothing_twice(
    deployment: Deployment,
) -> None:
    """200,000 sessions, half expired, batches of 2,000. The 11th batch's DELETE waits on a row
    the test holds; the worker is SIGKILLed then. Its transaction never commits; a new worker
    retries the batch after the heartbeat timeout and finishes the sweep."""
    await deployment.seed(1, ROWS)
    before = await deployment.rows()
    expired = await deployment.expired()
    in_period = set(before) - expired
    assert len(expired) == ROWS // 2
    (blocker,) = await _walk(deployment, 1, offset=(KILLED_BATCH - 1) * BATCH + BATCH // 2)

    dying = deployment.worker()
    await dying.start()
    async with _locked(deployment, blocker):
        ran = await deployment.lethe("retention", "run", "--batch-size", str(BATCH), "--by", "dpo")
        assert ran.code == 0, str(ran)
        run_id = _started(ran)
        await _until(lambda: _sweep_statements(deployment, waiting=True), 60)
        progress = await deployment.progress(run_id)
        assert progress is not None
        (task,) = progress.tasks
        done_before = task.batches
        assert (done_before, task.removed) == (KILLED_BATCH - 1, (KILLED_BATCH - 1) * BATCH)
        await dying.kill()

        # Nothing within the period was touched; nothing of the killed batch is gone yet.
        now = await deployment.rows()
        assert all(now[key] == before[key] for key in in_period)
        assert len(set(before) - set(now)) == done_before * BATCH
    # The lock released, the dead worker's DELETE runs on, finds no one to answer and is
    # rolled back: the killed batch removed nothing.
    await _until(lambda: _no_sweep_statements(deployment), 30)
    now = await deployment.rows()
    assert len(set(before) - set(now)) == done_before * BATCH and blocker in now
    entries = await deployment.ledger(run_id)
    assert len(_batches(entries)) == done_before and _removed(entries) == done_before * BATCH

    await deployment.worker().start()
    report = await asyncio.wait_for(sweeps.follow(deployment.temporal, run_id), RECOVERY_TIMEOUT)

    after = await deployment.rows()
    assert set(after) == in_period  # every expired row gone
    assert all(after[key] == before[key] for key in in_period)  # the rest byte-identical
    (task,) = report.tasks
    assert (task.status, task.removed, task.held, task.undated) == ("done", ROWS // 2, 0, 0)
    entries = await deployment.ledger(run_id)
    batches = _batches(entries)
    assert _removed(entries) == ROWS // 2 == entries[-1].details["removed"]
    assert [entry.details["batch"] for entry in batches] == list(range(1, ROWS // 2 // BATCH + 1))
    assert [entry.action for entry in entries].count("retention.finished") == 1
    _assert_no_personal_data(deployment, entries)
    attempts = await _attempts(deployment, run_id)
    assert attempts[f"{TASK}#{KILLED_BATCH}"] == 2  # the killed batch, retried once
    assert {n for key, n in attempts.items() if key != f"{TASK}#{KILLED_BATCH}"} == {1}


@pytest.mark.timeout(240)
async def test_a_batch_committed_by_a_worker_that_dies_before_completing_is_counted_once(
    deployment: Deployment,
) -> None:
    """10,000 sessions, half expired. The first batch commits, then its worker ends before the
    activity completes. The rows must come out right, and the ledger must count the batch once:
    the batch told its result (and where it ends) before its commit, so the retry finds its
    range emptied and returns that result instead of sweeping the next rows as if new."""
    rows, expired_rows = 10_000, 5_000
    await deployment.seed(1, rows)
    before = await deployment.rows()
    expired = await deployment.expired()
    in_period = set(before) - expired
    first_batch = set(await _walk(deployment, BATCH))

    dying = deployment.worker(CRASH_SCRIPT, **{CRASH_AFTER: SWEEP_TABLE})
    await dying.start()
    ran = await deployment.lethe("retention", "run", "--batch-size", str(BATCH), "--by", "dpo")
    assert ran.code == 0, str(ran)
    run_id = _started(ran)
    assert dying.process is not None
    assert await asyncio.wait_for(dying.process.wait(), 60) == EXIT_CODE, dying.log_text()[-3000:]
    assert MARKER in dying.log_text()

    now = await deployment.rows()
    assert set(before) - set(now) == first_batch  # the first batch committed, the oldest rows
    assert all(now[key] == before[key] for key in in_period)
    assert _batches(await deployment.ledger(run_id)) == []

    await deployment.worker().start()
    report = await asyncio.wait_for(sweeps.follow(deployment.temporal, run_id), RECOVERY_TIMEOUT)
    after = await deployment.rows()
    assert set(after) == in_period
    assert all(after[key] == before[key] for key in in_period)
    entries = await deployment.ledger(run_id)
    counted = _removed(entries)
    assert counted == report.removed == entries[-1].details["removed"]
    assert (await _attempts(deployment, run_id))[f"{TASK}#1"] == 2
    # The batch told its result before its commit; the retry found its range empty, so it
    # returned that result instead of sweeping again: every removed row is counted once.
    assert counted == expired_rows
