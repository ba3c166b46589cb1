"""The SDK's public face, `lethe.Client`: a service starts an erasure through it, and the subject
reaches Temporal only as its keyed reference, never in clear."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

import lethe
from lethe.contracts import ErasureRequest, ErasureStart, Subject
from lethe.kernel.config import Settings
from lethe.kernel.subjects import subject_ref
from lethe.temporal import search_attributes as sa

KEY = bytes(range(32))
TENANT = "st-mary"
PATIENT = "pt-sdk-ada-1815"
EMAIL = "ada.sdk@st-mary.example"
MRN = "MRN-SDK-0042"


def _request(subject_id: str = PATIENT) -> ErasureRequest:
    identities = {"email": EMAIL, "mrn": MRN}
    return ErasureRequest(
        subject=Subject(tenant=TENANT, subject_id=subject_id, identities=identities),
        reason="Art. 17 request by letter",
        requested_by="clerk",
    )


@pytest.fixture
async def client(local_env: WorkflowEnvironment) -> AsyncIterator[lethe.Client]:
    """`lethe.Client` on the embedded server, its control queue a fresh one no worker polls
    (so an erasure it starts stays as started); what it started is terminated afterwards."""
    settings = Settings(
        subject_key=base64.b64encode(KEY).decode(),
        control_queue=f"lethe-sdk-{uuid.uuid4().hex[:8]}-control",
    )
    found = lethe.Client(local_env.client, settings)
    yield found
    query = f"TaskQueue = '{settings.control_queue}' AND ExecutionStatus = 'Running'"
    async for execution in local_env.client.list_workflows(query):
        await local_env.client.get_workflow_handle(execution.id).terminate(reason="test ended")


async def _start_input(
    client: lethe.Client, handle: WorkflowHandle[Any, Any]
) -> tuple[bytes, ErasureStart]:
    """The history as the server stores it (bytes), and the start input as the workflow sees it."""
    history = await handle.fetch_history()
    started = history.events[0].workflow_execution_started_event_attributes
    (start,) = await client.temporal.data_converter.decode(started.input.payloads, [ErasureStart])
    assert isinstance(start, ErasureStart)
    return b"".join(event.SerializeToString() for event in history.events), start


async def test_an_erasure_names_the_subject_only_by_its_keyed_reference(
    client: lethe.Client,
) -> None:
    ref = subject_ref(TENANT, PATIENT, KEY)

    submission = await client.erase(_request())

    assert submission.workflow_id == f"erasure-{ref}" and not submission.joined
    handle = client.temporal.get_workflow_handle(submission.workflow_id)
    described = await handle.describe()
    attributes = {pair.key.name: pair.value for pair in described.typed_search_attributes}
    assert attributes == {
        sa.KIND.name: "erasure",
        sa.STATUS.name: "planning",
        sa.TENANT.name: TENANT,
        sa.SUBJECT_REF.name: ref,
    }
    stored, start = await _start_input(client, handle)
    # The workflow gets the subject (its activities need it), through the codec only: the
    # bytes the server stores hold no identifier in clear, in any field of any event.
    assert start.subject_ref == ref
    assert start.request.subject.subject_id == PATIENT
    assert start.request.subject.identities == {"email": EMAIL, "mrn": MRN}
    for identifier in (PATIENT, EMAIL, MRN):
        assert identifier.encode() not in stored
        assert identifier not in repr(described.raw_description)


async def test_the_reference_is_keyed_and_a_second_request_joins_the_first(
    client: lethe.Client,
) -> None:
    first = await client.erase(_request())
    again = await client.erase(_request())
    other = await client.erase(_request("pt-sdk-grace-1906"))

    assert again.workflow_id == first.workflow_id and again.joined
    assert other.workflow_id != first.workflow_id and not other.joined
    # Under another subject key the same subject has another reference: it is keyed, not a hash.
    rekeyed = Settings(subject_key=base64.b64encode(bytes(32)).decode())
    assert lethe.Client(client.temporal, rekeyed).workflow_id(TENANT, PATIENT) != (
        first.workflow_id
    )
    assert client.workflow_id(TENANT, PATIENT) == first.workflow_id
