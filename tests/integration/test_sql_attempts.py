"""The SQL step's count on the stack's Temporal server: it is there before the commit.

Erase heartbeats the count of the subject's rows inside its transaction and asks the server
(describing the workflow) until it holds it, so that a retry after a worker lost between the
commit and the activity's completion finds it (tests/e2e/test_effects_once.py ends a worker
there). Here one real worker runs the step and its evidence says the count was confirmed.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from temporalio import workflow
from temporalio.client import Client as TemporalClient
from temporalio.common import RetryPolicy
from temporalio.worker import Worker

from lethe.activities import sql
from lethe.contracts import StepOutcome, StepRequest
from lethe.kernel.regions import task_queue
from tests.integration.test_sql import (
    Hospital,
    _close_engines,
    hospital,
    lab_results_locator,
    request_for,
)

__all__ = ["_close_engines", "hospital"]  # fixtures, shared with test_sql.py


@workflow.defn(sandboxed=False)  # defined beside the test, which imports non-workflow code
class OneSqlStep:
    """Runs one SQL step's erase activity, as the regional workflow does."""

    @workflow.run
    async def run(self, request: StepRequest) -> StepOutcome:
        outcome: StepOutcome = await workflow.execute_activity(
            "sql.erase",
            request,
            result_type=StepOutcome,
            start_to_close_timeout=timedelta(seconds=60),
            heartbeat_timeout=timedelta(seconds=30),
            retry_policy=RetryPolicy(maximum_attempts=1),
        )
        return outcome


async def test_the_count_reaches_the_server_before_the_commit(
    hospital: Hospital,
    stack_temporal: TemporalClient,
    sql_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LETHE_TEST_PATIENTS_URL", sql_url)
    request = request_for(
        lab_results_locator(hospital), "delete", connection="LETHE_TEST_PATIENTS_URL"
    )
    region = f"sqlcount{uuid.uuid4().hex[:8]}"  # a queue no other worker serves
    request = request.model_copy(
        update={"step": request.step.model_copy(update={"region": region})}
    )
    queue = task_queue(region)
    async with Worker(
        stack_temporal,
        task_queue=queue,
        workflows=[OneSqlStep],
        activities=[sql.erase],
    ):
        outcome = await stack_temporal.execute_workflow(
            OneSqlStep.run, request, id=f"sql-count-{uuid.uuid4()}", task_queue=queue
        )
    assert (outcome.status, outcome.affected) == ("done", 2)
    assert outcome.evidence["count_confirmed"] is True
    assert (await hospital.rows())["lab_results"] == [(12, 3, "LDL 2.9")]
