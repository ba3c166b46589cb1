"""Retention sweeps for services and the CLI: start one (or a dry run), follow it, read its
report, list recent ones, and schedule them.

A sweep is the workflow `RetentionSweepWorkflow` on the control queue, its id `retention-<12
hex>` (a dry run: `retention-plan-<12 hex>`; a scheduled one: the schedule's id and its start
time). One sweep runs at a time: starting another while one runs is refused, naming it. The
report is the workflow's result and is kept in Lethe's store when the sweep closes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from temporalio.client import Client as TemporalClient
from temporalio.client import (
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleState,
    WorkflowFailureError,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes

from lethe.contracts import Contract, SweepReport, SweepRequest
from lethe.evidence import sweep_reports
from lethe.evidence.store import engine_for
from lethe.kernel.config import Settings
from lethe.kernel.deadlines import format_duration
from lethe.kernel.errors import LetheError, failure_reason
from lethe.kernel.regions import CONTROL_QUEUE as DEFAULT_CONTROL_QUEUE
from lethe.sdk.client import answer
from lethe.sdk.schedules import listed, upsert_schedule
from lethe.temporal import search_attributes as sa
from lethe.workflows.retention import DRY_RUN_KIND, KIND, RetentionSweepWorkflow

QUERY_TIMEOUT = timedelta(seconds=12)
"""Longer than the sticky-queue timeout (10 s), so a query right after a worker crash answers."""
SCHEDULE_ID = "lethe-retention"
DEFAULT_CATCHUP = timedelta(hours=1)
"""How late a missed scheduled sweep may still start (after the server or workers were down)."""


class SweepRunning(LetheError):
    """Another retention sweep is running: one at a time."""


class SweepFailed(LetheError):
    """A sweep ended without a report (it failed, was cancelled, or was terminated)."""


def schedule_id(control_queue: str) -> str:
    """The retention Schedule's id for a deployment (`lethe-retention` for `lethe-control`)."""
    return (
        SCHEDULE_ID if control_queue == DEFAULT_CONTROL_QUEUE else f"{SCHEDULE_ID}-{control_queue}"
    )


async def running_sweep(temporal: TemporalClient, control_queue: str) -> str | None:
    """The workflow id of a sweep (not a dry run) running on this control queue, if any."""
    query = (
        f"{sa.KIND.name} = '{KIND}' AND TaskQueue = '{control_queue}' "
        "AND ExecutionStatus = 'Running'"
    )
    found = await listed(temporal, query, limit=1)
    return found[0].id if found else None


class EndedSweep(Contract):
    """A sweep (or dry run) that ended without a report: failed, cancelled, terminated or
    timed out, and why."""

    run_id: str
    status: str
    started_at: datetime | None = None
    reason: str = ""


async def ended_without_report(
    temporal: TemporalClient, control_queue: str, limit: int = 10
) -> list[EndedSweep]:
    """The latest sweeps on this control queue that ended without a report (a pack conflict,
    a data map that cannot be read, a termination), newest first, each with its reason."""
    query = (
        f"{sa.KIND.name} IN ('{KIND}', '{DRY_RUN_KIND}') AND TaskQueue = '{control_queue}' "
        "AND ExecutionStatus != 'Running' AND ExecutionStatus != 'Completed' "
        "AND ExecutionStatus != 'ContinuedAsNew'"
    )
    ended: list[EndedSweep] = []
    for execution in await listed(temporal, query, limit):
        reason = ""
        try:
            await temporal.get_workflow_handle(execution.id, run_id=execution.run_id).result(
                follow_runs=False
            )
        except WorkflowFailureError as exc:
            reason = failure_reason(exc)
        status = execution.status.name.lower() if execution.status else "unknown"
        ended.append(
            EndedSweep(
                run_id=execution.id, status=status, started_at=execution.start_time, reason=reason
            )
        )
    return ended


async def start_sweep(temporal: TemporalClient, settings: Settings, request: SweepRequest) -> str:
    """Start a sweep (or, `dry_run`, a count of what one would remove); its run id.
    SweepRunning when a sweep runs already (a dry run may run beside one)."""
    if not request.dry_run:
        running = await running_sweep(temporal, settings.control_queue)
        if running is not None:
            raise SweepRunning(
                f"retention sweep {running} is running: follow it with `lethe retention status` "
                "and start the next when it has closed"
            )
    kind = DRY_RUN_KIND if request.dry_run else KIND
    run_id = f"{'retention-plan' if request.dry_run else 'retention'}-{uuid.uuid4().hex[:12]}"
    await temporal.start_workflow(
        RetentionSweepWorkflow.run,
        request,
        id=run_id,
        task_queue=settings.control_queue,
        search_attributes=TypedSearchAttributes([SearchAttributePair(sa.KIND, kind)]),
    )
    return run_id


async def sweep_progress(
    temporal: TemporalClient, run_id: str, timeout: timedelta = QUERY_TIMEOUT
) -> SweepReport | None:
    """The running sweep's report so far (None while it plans); ServiceUnavailable when no
    control worker answers."""
    handle = temporal.get_workflow_handle_for(RetentionSweepWorkflow.run, run_id)
    return await answer(
        handle.query(RetentionSweepWorkflow.progress, rpc_timeout=timeout),
        what=f"the progress of {run_id}",
        unknown=sweep_reports.UnknownSweep(f"no retention sweep {run_id[:100]}"),
    )


async def follow(
    temporal: TemporalClient,
    run_id: str,
    on_progress: Callable[[SweepReport], None] | None = None,
    every: timedelta = timedelta(seconds=1),
) -> SweepReport:
    """Wait for a sweep to close, calling `on_progress` with its report as it goes; its final
    report. SweepFailed when it ends any other way."""
    handle = temporal.get_workflow_handle_for(RetentionSweepWorkflow.run, run_id)
    result = asyncio.ensure_future(handle.result())
    try:
        while not result.done():
            if on_progress is not None:
                progress = await sweep_progress(temporal, run_id)
                if progress is not None:
                    on_progress(progress)
            await asyncio.wait([result], timeout=every.total_seconds())
        return result.result()
    except WorkflowFailureError as exc:
        raise SweepFailed(f"{run_id} ended without a report: {failure_reason(exc)}") from None
    finally:
        result.cancel()


async def report(temporal: TemporalClient, settings: Settings, run_id: str) -> SweepReport:
    """A sweep's report: the kept one once it has closed, else its progress so far."""
    store = await engine_for(settings.store_url.get_secret_value())
    try:
        return await sweep_reports.read(store, run_id)
    except sweep_reports.UnknownSweep as kept:
        progress = await sweep_progress(temporal, run_id)
        if progress is None or progress.finished_at is not None:
            raise kept from None
        return progress


async def recent(settings: Settings, limit: int = 20) -> list[SweepReport]:
    """The latest closed sweeps' reports, newest first."""
    store = await engine_for(settings.store_url.get_secret_value())
    return await sweep_reports.recent(store, limit)


async def schedule_sweeps(
    temporal: TemporalClient,
    settings: Settings,
    every: timedelta,
    request: SweepRequest,
    catchup: timedelta = DEFAULT_CATCHUP,
) -> tuple[str, bool, list[datetime]]:
    """Create or update the retention Schedule: a sweep every `every`, skipped while the last
    one runs, a missed one started up to `catchup` late. Its id, True if created, the next
    run times."""
    if request.dry_run:
        raise LetheError("a schedule runs sweeps, not dry runs: leave dry_run unset")
    sid = schedule_id(settings.control_queue)
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            RetentionSweepWorkflow.run,
            request,
            id=sid,
            task_queue=settings.control_queue,
            typed_search_attributes=TypedSearchAttributes([SearchAttributePair(sa.KIND, KIND)]),
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=every)]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP, catchup_window=catchup),
        state=ScheduleState(
            note=f"retention sweep every {format_duration(every)}, set by {request.requested_by}"
        ),
    )
    created, upcoming = await upsert_schedule(temporal, sid, schedule)
    return sid, created, upcoming
