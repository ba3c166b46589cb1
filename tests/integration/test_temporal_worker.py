"""Lethe's worker on the stack's Temporal server: a round trip, and only ciphertext in history."""

from __future__ import annotations

import uuid

import pytest
from temporalio import workflow
from temporalio.client import Client as TemporalClient
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

from lethe import worker as lethe_worker
from lethe.activities.connectors import Connectors
from lethe.codec.converter import ENCODING
from lethe.contracts import HealthCheckRequest
from lethe.kernel.config import Settings
from lethe.kernel.regions import task_queue
from lethe.temporal.history import history_payloads
from lethe.workflows.healthcheck import HealthCheckWorkflow

MARKER = "patient-ada-lovelace-1815"


@workflow.defn(sandboxed=False)  # defined beside the test, which imports non-workflow code
class FailingWorkflow:
    """Fails with a message that must not reach the server in clear."""

    @workflow.run
    async def run(self, note: str) -> None:
        raise ApplicationError(f"failed while handling {note}", non_retryable=True)


async def _raw_client(client: TemporalClient) -> TemporalClient:
    """A client of the same server with no codec: it sees what the server stores."""
    return await TemporalClient.connect(
        client.service_client.config.target_host, namespace=client.namespace
    )


async def test_round_trip_through_lethe_worker_stores_only_ciphertext(
    stack_temporal: TemporalClient, settings: Settings, connectors: Connectors
) -> None:
    region = "smoke"
    workflow_id = f"healthcheck-{uuid.uuid4()}"
    async with lethe_worker.build_worker(stack_temporal, region, settings, connectors):
        report = await stack_temporal.execute_workflow(
            HealthCheckWorkflow.run,
            HealthCheckRequest(token=MARKER),
            id=workflow_id,
            task_queue=task_queue(region),
        )
    assert report.token == MARKER
    assert report.task_queue == "lethe-smoke"

    history = (
        await (await _raw_client(stack_temporal)).get_workflow_handle(workflow_id).fetch_history()
    )
    payloads = history_payloads(history)
    # input and result of the workflow and of the activity
    assert len(payloads) >= 4
    assert all(p.metadata["encoding"] == ENCODING for p in payloads)
    assert MARKER.encode() not in history.to_json().encode()
    for payload in payloads:
        assert MARKER.encode() not in payload.data


async def test_failure_messages_are_encrypted_too(
    stack_temporal: TemporalClient, settings: Settings
) -> None:
    queue = task_queue("smoke-failure")
    workflow_id = f"failing-{uuid.uuid4()}"
    async with Worker(stack_temporal, task_queue=queue, workflows=[FailingWorkflow]):
        with pytest.raises(WorkflowFailureError) as caught:
            await stack_temporal.execute_workflow(
                FailingWorkflow.run, MARKER, id=workflow_id, task_queue=queue
            )
    # Through the codec the message is readable...
    assert MARKER in str(caught.value.cause)

    # ...but the server holds only the placeholder and an encrypted attributes payload.
    history = (
        await (await _raw_client(stack_temporal)).get_workflow_handle(workflow_id).fetch_history()
    )
    assert MARKER not in history.to_json()
    failed = [e for e in history.events if e.HasField("workflow_execution_failed_event_attributes")]
    failure = failed[0].workflow_execution_failed_event_attributes.failure
    assert failure.message == "Encoded failure"
    assert failure.encoded_attributes.metadata["encoding"] == ENCODING
