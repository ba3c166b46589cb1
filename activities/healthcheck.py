"""The health-check activity: the worker that picks it up reports who and where it is."""

from __future__ import annotations

from datetime import UTC, datetime

from temporalio import activity

from lethe.contracts import HealthCheckReport, HealthCheckRequest


@activity.defn
async def report_worker(request: HealthCheckRequest) -> HealthCheckReport:
    """Answer a health check with this worker's task queue and identity."""
    info = activity.info()
    return HealthCheckReport(
        token=request.token,
        task_queue=info.task_queue,
        worker_identity=activity.client().identity,
        answered_at=datetime.now(UTC),
    )
