"""The SQL step's attempts on the stack's Temporal server: the count is there before the
commit, and a statement slower than the heartbeat timeout runs once.

Erase heartbeats the count of the subject's rows inside its transaction and asks the server
(describing the workflow) until it holds it, so that a retry after a worker lost between the
commit and the activity's completion finds it (tests/e2e/test_effects_once.py ends a worker
there). Here one real worker runs the step and its evidence says the count was confirmed.

While a statement runs, the activity heartbeats its last details again (`kept_alive`), so
Temporal does not take a slow attempt for lost and start a second one beside it.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import text
from temporalio import workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client as TemporalClient
from temporalio.common import RetryPolicy
from temporalio.worker import Worker

from lethe.activities.connectors import Connectors
from lethe.contracts import StepOutcome, StepRequest
from lethe.kernel.regions import task_queue
from tests.integration.test_sql import (
    Hospital,
    hospital,
    lab_results_locator,
    request_for,
)

__all__ = ["hospital"]  # fixtures, shared with test_sql.py


SLOW_SECONDS = 6
"""How long the slow statement sleeps: three heartbeat timeouts of the slow test."""


@workflow.defn(sandboxed=False)  # defined beside the test, which imports non-workflow code
class OneSqlStep:
    """Runs one SQL step's erase activity, as the regional workflow does, with the heartbeat
    timeout and the attempts given."""

    @workflow.run
    async def run(self, request: StepRequest, heartbeat_seconds: int, attempts: int) -> StepOutcome:
        outcome: StepOutcome = await workflow.execute_activity(
            "sql.erase",
            request,
            result_type=StepOutcome,
            start_to_close_timeout=timedelta(seconds=60),
            heartbeat_timeout=timedelta(seconds=heartbeat_seconds),
            retry_policy=RetryPolicy(
                maximum_attempts=attempts, initial_interval=timedelta(seconds=1)
            ),
        )
        return outcome


async def _delete_lab_results(
    connectors: Connectors,
    hospital: Hospital,
    temporal: TemporalClient,
    workflow_id: str,
    *,
    heartbeat_seconds: int,
    attempts: int,
) -> StepOutcome:
    """Delete the subject's lab results (LETHE_TEST_PATIENTS_URL) in one `OneSqlStep` run, on a
    region, and so a task queue, that no other worker serves."""
    request = request_for(
        lab_results_locator(hospital), "delete", connection="LETHE_TEST_PATIENTS_URL"
    )
    region = f"sql{uuid.uuid4().hex[:8]}"
    request = request.model_copy(
        update={"step": request.step.model_copy(update={"region": region})}
    )
    queue = task_queue(region)
    async with Worker(
        temporal,
        task_queue=queue,
        workflows=[OneSqlStep],
        activities=[connectors.activity("sql.erase")],
    ):
        return await temporal.execute_workflow(
            OneSqlStep.run,
            args=[request, heartbeat_seconds, attempts],
            id=workflow_id,
            task_queue=queue,
        )


async def test_a_statement_slower_than_the_heartbeat_timeout_runs_once(
    connectors: Connectors,
    hospital: Hospital,
    stack_temporal: TemporalClient,
    sql_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A trigger makes the DELETE sleep for three heartbeat timeouts and logs each statement;
    the activity is kept alive, so one attempt runs and the trigger fires once."""
    monkeypatch.setenv("LETHE_TEST_PATIENTS_URL", sql_url)
    schema = hospital.schema
    async with hospital.engine.begin() as conn:
        await conn.execute(text(f"CREATE TABLE {schema}.statements (at timestamptz NOT NULL)"))
        await conn.execute(
            text(
                f"CREATE FUNCTION {schema}.slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"INSERT INTO {schema}.statements VALUES (clock_timestamp()); "
                f"PERFORM pg_sleep({SLOW_SECONDS}); RETURN NULL; END $$"
            )
        )
        await conn.execute(
            text(
                f"CREATE TRIGGER slow BEFORE DELETE ON {schema}.lab_results "
                f"FOR EACH STATEMENT EXECUTE FUNCTION {schema}.slow()"
            )
        )
    workflow_id = f"sql-slow-{uuid.uuid4()}"
    outcome = await _delete_lab_results(
        connectors, hospital, stack_temporal, workflow_id, heartbeat_seconds=2, attempts=3
    )
    history = await stack_temporal.get_workflow_handle(workflow_id).fetch_history()
    started = [
        e.activity_task_started_event_attributes
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
    ]

    assert (outcome.status, outcome.affected) == ("done", 2)
    assert [s.attempt for s in started] == [1]
    assert "attempt" not in outcome.evidence  # a retry's evidence would say which attempt
    async with hospital.engine.connect() as conn:
        statements = (await conn.execute(text(f"SELECT count(*) FROM {schema}.statements"))).one()
    assert statements == (1,)
    assert (await hospital.rows())["lab_results"] == [(12, 3, "LDL 2.9")]


async def test_the_count_reaches_the_server_before_the_commit(
    connectors: Connectors,
    hospital: Hospital,
    stack_temporal: TemporalClient,
    sql_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LETHE_TEST_PATIENTS_URL", sql_url)
    outcome = await _delete_lab_results(
        connectors,
        hospital,
        stack_temporal,
        f"sql-count-{uuid.uuid4()}",
        heartbeat_seconds=30,
        attempts=1,
    )
    assert (outcome.status, outcome.affected) == ("done", 2)
    assert outcome.evidence["count_confirmed"] is True
    assert (await hospital.rows())["lab_results"] == [(12, 3, "LDL 2.9")]
