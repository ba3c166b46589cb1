"""A step of an erasure as one activity on its region's queue (`step_outcome`), and the child
workflow that ran a region's steps for requests started before patch `steps-from-parent`.

Each step is one activity that erases and then verifies. One failing step does not stop the
others. `RegionalErasureWorkflow` stays registered on every regional worker so that runs started
with children finish; its `progress` query answers which of its steps have finished.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from lethe.contracts import RegionJob, Step, StepOutcome, StepRequest, VerifyRequest
    from lethe.kernel.errors import failure_reason

CONNECTOR_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=10),
    maximum_attempts=0,
)
"""Transient failures (unreachable, timeouts, throttling) retry with capped backoff until the
job's `retry_until`; configuration errors are non-retryable and fail at once."""
CONNECTOR_TIMEOUT = timedelta(minutes=10)
CONNECTOR_HEARTBEAT = timedelta(seconds=20)
"""A lost worker's step runs again on another within this (the activity re-sends its last
heartbeat every third of it while a statement is slow, so a live one is never taken for lost)."""
MIN_RETRY_SPAN = timedelta(hours=1)
"""However close the deadline, a step gets at least this long to get through an outage."""
LEGACY_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(minutes=2),
    maximum_attempts=8,
)
"""Runs started before `retry_until` existed keep their eight attempts."""
STEP_ACTIVITY_IDS = "step-activity-ids"
"""Patch: each step's activity id is the step id, so `lethe status` can show its retries."""


@workflow.defn
class RegionalErasureWorkflow:
    """Erase and verify one region's steps of one phase."""

    def __init__(self) -> None:
        self._finished: dict[str, StepOutcome] = {}

    @workflow.query
    def progress(self) -> dict[str, StepOutcome]:
        """The outcomes of the steps finished so far."""
        return dict(self._finished)

    @workflow.run
    async def run(self, job: RegionJob) -> list[StepOutcome]:
        return list(await asyncio.gather(*(self._step(job, step) for step in job.steps)))

    async def _step(self, job: RegionJob, step: Step) -> StepOutcome:
        outcome = await step_outcome(job, step, lambda: self._activity_id(step))
        self._finished[step.id] = outcome
        return outcome

    @staticmethod
    def _activity_id(step: Step) -> str | None:
        return step.id if workflow.patched(STEP_ACTIVITY_IDS) else None


async def step_outcome(
    job: RegionJob,
    step: Step,
    activity_id: Callable[[], str | None],
    task_queue: str | None = None,
) -> StepOutcome:
    """One step of a region's job: retained in place, else one activity that erases and
    verifies (or, for a step erased before, verifies again) on `task_queue` (default: the
    workflow's own). `activity_id` is asked just before the activity is scheduled. A step
    whose activity fails is a `failed` outcome with the reason: the other steps go on."""
    if step.action == "retain":
        basis = "; ".join(
            d.exception or d.citation for d in step.decisions if d.strategy == "retain"
        )
        return StepOutcome(step_id=step.id, status="retained", detail=f"kept: {basis}")
    request = StepRequest(
        request_id=job.request_id,
        subject_ref=job.subject_ref,
        subject=job.subject,
        step=step,
        erasure_started_at=job.erasure_started_at,
        window_ends_at=job.window_ends_at,
        subject_found=job.subject_found,
    )
    erased = job.erased.get(step.id)
    # Retries last until a margin before the deadline, not a fixed number of attempts.
    retry, span = LEGACY_RETRY, None
    if job.retry_until is not None:
        retry, span = CONNECTOR_RETRY, max(job.retry_until - workflow.now(), MIN_RETRY_SPAN)
    named = activity_id()
    # One activity erases and verifies (one round trip a step); a re-check (e.g. pending
    # compaction) verifies again what was erased before.
    operation, argument = (
        ("erase", request)
        if erased is None
        else ("verify", VerifyRequest(request=request, erased=erased))
    )
    try:
        done: StepOutcome = await workflow.execute_activity(
            f"{step.kind}.{operation}",
            argument,
            result_type=StepOutcome,
            activity_id=named,
            task_queue=task_queue,
            start_to_close_timeout=CONNECTOR_TIMEOUT,
            schedule_to_close_timeout=span,
            heartbeat_timeout=CONNECTOR_HEARTBEAT,
            retry_policy=retry,
        )
        return done
    except ActivityError as error:
        return StepOutcome(step_id=step.id, status="failed", detail=failure_reason(error))
