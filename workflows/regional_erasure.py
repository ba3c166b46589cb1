"""One region's share of an erasure: its steps run in parallel on `lethe-<region>`.

Each step is erased, then verified. One failing step does not stop the others; each reports its
outcome to the parent as it finishes, so the parent's status query shows progress.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from lethe.contracts import RegionJob, Step, StepOutcome, StepRequest, VerifyRequest

CONNECTOR_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=2),
    maximum_attempts=8,
)
CONNECTOR_TIMEOUT = timedelta(minutes=10)
CONNECTOR_HEARTBEAT = timedelta(minutes=1)


def failure_detail(error: ActivityError) -> str:
    """The reason an activity failed, as its ApplicationError states it (never personal data)."""
    cause = error.cause
    if isinstance(cause, ApplicationError):
        return f"{cause.type or 'error'}: {cause.message}"
    return type(cause).__name__ if cause else "activity failed"


@workflow.defn
class RegionalErasureWorkflow:
    """Erase and verify one region's steps of one phase."""

    @workflow.run
    async def run(self, job: RegionJob) -> list[StepOutcome]:
        return list(await asyncio.gather(*(self._step(job, step) for step in job.steps)))

    async def _step(self, job: RegionJob, step: Step) -> StepOutcome:
        if step.action == "retain":
            basis = "; ".join(
                d.exception or d.citation for d in step.decisions if d.strategy == "retain"
            )
            outcome = StepOutcome(step_id=step.id, status="retained", detail=f"kept: {basis}")
            await self._report(job, outcome)
            return outcome
        request = StepRequest(
            request_id=job.request_id,
            subject_ref=job.subject_ref,
            subject=job.subject,
            step=step,
            erasure_started_at=job.erasure_started_at,
            window_ends_at=job.window_ends_at,
        )
        try:
            erased = job.erased.get(step.id) or await workflow.execute_activity(
                f"{step.kind}.erase",
                request,
                result_type=StepOutcome,
                start_to_close_timeout=CONNECTOR_TIMEOUT,
                heartbeat_timeout=CONNECTOR_HEARTBEAT,
                retry_policy=CONNECTOR_RETRY,
            )
            outcome = erased
            if erased.status not in ("retained", "failed"):
                outcome = await workflow.execute_activity(
                    f"{step.kind}.verify",
                    VerifyRequest(request=request, erased=erased),
                    result_type=StepOutcome,
                    start_to_close_timeout=CONNECTOR_TIMEOUT,
                    heartbeat_timeout=CONNECTOR_HEARTBEAT,
                    retry_policy=CONNECTOR_RETRY,
                )
        except ActivityError as error:
            outcome = StepOutcome(step_id=step.id, status="failed", detail=failure_detail(error))
        await self._report(job, outcome)
        return outcome

    async def _report(self, job: RegionJob, outcome: StepOutcome) -> None:
        parent = workflow.get_external_workflow_handle(job.parent_id)
        await parent.signal("step_progress", outcome)
