"""A round trip through Temporal, a region's worker and the codec, proving the region is served."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from lethe.activities.healthcheck import report_worker
    from lethe.contracts import HealthCheckReport, HealthCheckRequest


@workflow.defn
class HealthCheckWorkflow:
    """Runs one activity on the region's task queue and returns what the worker said."""

    @workflow.run
    async def run(self, request: HealthCheckRequest) -> HealthCheckReport:
        return await workflow.execute_activity(
            report_worker,
            request,
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=RetryPolicy(maximum_attempts=3),
        )
