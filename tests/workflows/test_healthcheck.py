"""The health-check workflow on both embedded servers, which start from the wheels offline."""

from __future__ import annotations

import uuid

from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from lethe.activities.healthcheck import report_worker
from lethe.contracts import HealthCheckReport, HealthCheckRequest
from lethe.kernel.regions import task_queue
from lethe.workflows.healthcheck import HealthCheckWorkflow


async def _round_trip(env: WorkflowEnvironment) -> HealthCheckReport:
    queue = task_queue("eu")
    async with Worker(
        env.client, task_queue=queue, workflows=[HealthCheckWorkflow], activities=[report_worker]
    ):
        return await env.client.execute_workflow(
            HealthCheckWorkflow.run,
            HealthCheckRequest(token="t-123"),
            id=f"healthcheck-{uuid.uuid4()}",
            task_queue=queue,
        )


def _check(report: HealthCheckReport) -> None:
    assert report.token == "t-123"
    assert report.task_queue == "lethe-eu"
    assert report.worker_identity


async def test_round_trip_under_time_skipping(time_skipping_env: WorkflowEnvironment) -> None:
    _check(await _round_trip(time_skipping_env))


async def test_round_trip_on_the_embedded_dev_server(local_env: WorkflowEnvironment) -> None:
    _check(await _round_trip(local_env))
