"""A bulk request's history: every run of its continue-as-new chain, followed to the window
timer that ends its immediate phase (the workflow starts it in the workflow task that sets its
state to `waiting_window`, after the last immediate batch's ledger entry)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client as TemporalClient
from temporalio.service import RPCError

from bench import BenchError
from bench.erasure_parts.erasures import is_window_timer
from bench.harness.workflows import CLOSED, _branch_changed, event_seconds

CONTINUED = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW


@dataclass(frozen=True)
class Chain:
    """The runs' histories (the last one up to the window timer) and that timer's time."""

    runs: list[Sequence[HistoryEvent]]
    timer_at: float

    @property
    def events(self) -> int:
        """History events over every run."""
        return sum(len(run) for run in self.runs)

    @property
    def bytes(self) -> int:
        """The serialised size of every run's events."""
        return sum(event.ByteSize() for run in self.runs for event in run)

    def count(self, kind: EventType.ValueType) -> int:
        """Events of one type over every run."""
        return sum(1 for run in self.runs for event in run if event.event_type == kind)


async def _first_run(temporal: TemporalClient, workflow_id: str) -> str:
    """The chain's first run id, from the current run's start event."""
    handle = temporal.get_workflow_handle(workflow_id)
    async for event in handle.fetch_history_events():
        return event.workflow_execution_started_event_attributes.first_execution_run_id
    raise BenchError(f"{workflow_id} has no history")


async def _one_run(
    temporal: TemporalClient, workflow_id: str, run_id: str
) -> tuple[list[HistoryEvent], str | None]:
    """One run's events up to the window timer (then None) or its continuation (the next run)."""
    handle = temporal.get_workflow_handle(workflow_id, run_id=run_id)
    while True:
        events: list[HistoryEvent] = []
        try:
            async for event in handle.fetch_history_events(wait_new_event=True):
                events.append(event)
                if is_window_timer(event):
                    return events, None
                if event.event_type == CONTINUED:
                    attributes = event.workflow_execution_continued_as_new_event_attributes
                    return events, attributes.new_execution_run_id
                if event.event_type in CLOSED:
                    raise BenchError(f"{workflow_id} closed before its immediate phase ended")
        except RPCError as exc:
            if not _branch_changed(exc):
                raise
            continue
        raise BenchError(f"{workflow_id}'s history ended without a window timer")


async def follow_chain(temporal: TemporalClient, workflow_id: str, timeout: float) -> Chain:
    """Long-poll every run of the chain until the window timer; TimeoutError after `timeout`."""
    runs: list[Sequence[HistoryEvent]] = []
    async with asyncio.timeout(timeout):
        run_id: str | None = await _first_run(temporal, workflow_id)
        while run_id is not None:
            events, run_id = await _one_run(temporal, workflow_id, run_id)
            runs.append(events)
    return Chain(runs, event_seconds(runs[-1][-1]))


async def run_ids(temporal: TemporalClient, workflow_id: str) -> list[str]:
    """Every run of the chain, first to last (for deleting them all)."""
    ids: list[str] = []
    run_id: str | None = await _first_run(temporal, workflow_id)
    while run_id is not None:
        ids.append(run_id)
        handle = temporal.get_workflow_handle(workflow_id, run_id=run_id)
        run_id = None
        async for event in handle.fetch_history_events():
            if event.event_type == CONTINUED:
                run_id = (
                    event.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
                )
    return ids
