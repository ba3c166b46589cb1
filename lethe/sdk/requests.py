"""Finding erasure requests: listing them through visibility, and whose a request is.

The one way the CLI and the API list requests (`listed`) and learn a request's tenant and
requester (`owner`: from the run's start, read once and kept, since neither ever changes).
"""

from __future__ import annotations

from datetime import datetime

from pydantic import Field
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from lethe.contracts import Contract, ErasureStart, ErasureState, Plan
from lethe.evidence import audit
from lethe.sdk.client import QUERY_TIMEOUT, Client, UnknownRequest, answer
from lethe.temporal import search_attributes as sa
from lethe.workflows.erasure import ErasureWorkflow

MAX_LISTED = 500
_OWNERS: dict[str, RequestOwner] = {}
_OWNERS_KEPT = 10_000


class RequestListed(Contract):
    """One erasure request as a listing shows it (facts and references only)."""

    id: str
    """The request's workflow id (`erasure-<subject reference>`)."""
    tenant: str | None = None
    state: str | None = None
    regions: list[str] = Field(default_factory=list)
    deadline: datetime | None = None
    started: datetime | None = None
    closed: datetime | None = None
    running: bool = False


class RequestOwner(Contract):
    """Whose request it is: its tenant and who asked for it."""

    tenant: str
    requested_by: str


async def listed(
    client: Client,
    *,
    tenant: str | None = None,
    state: ErasureState | None = None,
    region: str | None = None,
    since: datetime | None = None,
    limit: int = 50,
) -> list[RequestListed]:
    """Erasure requests, newest first, by tenant, state, region and start date."""
    query = audit.list_query(region=region, state=state, since=since, tenant=tenant)
    found: list[RequestListed] = []
    async for execution in client.temporal.list_workflows(query, limit=min(limit, MAX_LISTED)):
        attributes = execution.typed_search_attributes
        found.append(
            RequestListed(
                id=execution.id,
                tenant=attributes.get(sa.TENANT),
                state=attributes.get(sa.STATUS),
                regions=list(attributes.get(sa.REGIONS) or []),
                deadline=attributes.get(sa.DEADLINE),
                started=execution.start_time,
                closed=execution.close_time,
                running=execution.status == WorkflowExecutionStatus.RUNNING,
            )
        )
    return found


async def owner(client: Client, workflow_id: str) -> RequestOwner:
    """The tenant and requester of an erasure request (UnknownRequest if there is none)."""
    known = _OWNERS.get(workflow_id)
    if known is not None:
        return known
    if not workflow_id.startswith(("erasure-", "replay-")):
        raise UnknownRequest(f"no erasure request {workflow_id[:80]}")
    handle = client.temporal.get_workflow_handle(workflow_id)
    try:
        async for event in handle.fetch_history_events():
            payloads = event.workflow_execution_started_event_attributes.input.payloads
            decoded = await client.temporal.data_converter.decode(payloads, [ErasureStart])
            start = decoded[0]
            if not isinstance(start, ErasureStart):
                break
            found = RequestOwner(
                tenant=start.request.subject.tenant, requested_by=start.request.requested_by
            )
            if len(_OWNERS) >= _OWNERS_KEPT:
                _OWNERS.clear()
            _OWNERS[workflow_id] = found
            return found
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise
    raise UnknownRequest(f"no erasure request {workflow_id[:80]}")


async def plan_of(client: Client, workflow_id: str) -> Plan | None:
    """The plan a request follows, each step with its action and legal basis (None until it
    is planned)."""
    handle = client.temporal.get_workflow_handle_for(ErasureWorkflow.run, workflow_id)
    return await answer(
        handle.query(ErasureWorkflow.plan, rpc_timeout=QUERY_TIMEOUT),
        what=f"the plan of {workflow_id}",
        unknown=UnknownRequest(f"no erasure request {workflow_id}"),
    )
