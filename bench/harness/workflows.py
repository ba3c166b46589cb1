"""The workflows a run starts: followed through their histories, and removed afterwards.

Following a history (a long poll of the server) instead of querying the workflow keeps the
measurement off the worker's back: no query competes with the workflow for it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.api.workflowservice.v1 import DeleteWorkflowExecutionRequest
from temporalio.client import Client as TemporalClient
from temporalio.service import RPCError

T = TypeVar("T")

CLOSED = frozenset(
    {
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED,
    }
)
"""The event types that close a workflow."""


def event_seconds(event: HistoryEvent) -> float:
    """An event's time, in seconds since the epoch (the server's clock)."""
    return event.event_time.seconds + event.event_time.nanos / 1e9


async def gather_limited(limit: int, work: Iterable[Awaitable[T]]) -> list[T]:
    """Await every item, at most `limit` at a time; the results in order."""
    gate = asyncio.Semaphore(limit)

    async def one(item: Awaitable[T]) -> T:
        async with gate:
            return await item

    return list(await asyncio.gather(*(one(item) for item in work)))


def _branch_changed(exc: RPCError) -> bool:
    """The server ended a history long poll because the history's branch (or its versioned
    transitions) moved under it; reading the history again from the start is the remedy."""
    return any(
        detail.type_url.endswith("CurrentBranchChangedFailure")
        for detail in exc.grpc_status.details
    )


async def first_event(
    temporal: TemporalClient,
    workflow_id: str,
    wanted: Callable[[HistoryEvent], bool],
    timeout: float,
) -> HistoryEvent | None:
    """Long-poll a workflow's history until an event `wanted` accepts: that event; None when
    the workflow closes first. TimeoutError after `timeout` seconds."""
    handle = temporal.get_workflow_handle(workflow_id)
    async with asyncio.timeout(timeout):
        while True:
            try:
                async for event in handle.fetch_history_events(wait_new_event=True):
                    if wanted(event):
                        return event
                    if event.event_type in CLOSED:
                        return None
                return None
            except RPCError as exc:
                if not _branch_changed(exc):
                    raise


async def fetch_histories(
    temporal: TemporalClient, workflow_ids: list[str]
) -> list[Sequence[HistoryEvent]]:
    """The full histories of these workflows, ten fetched at a time."""

    async def fetch(workflow_id: str) -> Sequence[HistoryEvent]:
        history = await temporal.get_workflow_handle(workflow_id).fetch_history()
        return list(history.events)

    return await gather_limited(10, (fetch(workflow_id) for workflow_id in workflow_ids))


async def delete_workflows(
    temporal: TemporalClient, queues: list[str], known: list[str], *, keep: bool = False
) -> None:
    """Delete (terminating if running) every workflow of these task queues and those `known`;
    with `keep`, only terminate them, so their histories can be studied.

    Visibility lags behind a workflow's start, so the queues are listed again until a round
    finds nothing new.
    """
    query = " OR ".join(f"TaskQueue = '{queue}'" for queue in queues)
    done: set[str] = set()

    async def delete(workflow_id: str) -> None:
        with contextlib.suppress(Exception):
            if keep:
                await temporal.get_workflow_handle(workflow_id).terminate("benchmark over")
                return
            await temporal.workflow_service.delete_workflow_execution(
                DeleteWorkflowExecutionRequest(
                    namespace=temporal.namespace,
                    workflow_execution=WorkflowExecution(workflow_id=workflow_id),
                )
            )

    found = set(known)
    for _ in range(10):
        async for execution in temporal.list_workflows(query):
            found.add(execution.id)
        fresh = sorted(found - done)
        if not fresh and done:
            return
        await gather_limited(10, (delete(workflow_id) for workflow_id in fresh))
        done.update(fresh)
        await asyncio.sleep(1.0)
