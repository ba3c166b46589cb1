"""Where Lethe's time goes: the sweep's history (every run, across continue-as-new) per batch.

A batch is one `<kind>.sweep` activity. The cycle of a batch runs from the previous batch's
completion to its own: the workflow task that follows the completion (its wait for the worker,
then, inside it, the local activities between batches, which write the last batch's ledger
entry and read the holds for this one, and the rest of the task up to scheduling the
activity), the activity's wait in the region's queue, and its run. Local activities leave
markers whose data holds the moment each completed, so the task is split at those moments. The
segments of a cycle add up to it.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client as TemporalClient

from bench.harness.workflows import event_seconds

QUEUED_WFT = "workflow task: queued (the last batch done -> task started)"
REST = "rest of the workflow task (-> activity scheduled)"
QUEUED = "sql.sweep: queued (scheduled -> started)"
RAN = "sql.sweep: ran (started -> completed)"
CYCLE = "the batch's cycle (the last batch done -> this one done)"
FIRST_RAN = "once: the first batch's sql.sweep ran (counts every row besides)"
BEFORE = "once: workflow started -> first batch scheduled (planning, ledger)"
AFTER = "once: last batch done -> workflow completed (report, ledger)"


async def histories(temporal: TemporalClient, workflow_id: str) -> list[Sequence[HistoryEvent]]:
    """The histories of every run of the workflow, the first run first."""
    found: list[Sequence[HistoryEvent]] = []
    run_id: str | None = None
    while True:
        handle = temporal.get_workflow_handle(workflow_id, run_id=run_id)
        events = list((await handle.fetch_history()).events)
        found.insert(0, events)
        started = events[0].workflow_execution_started_event_attributes
        if not started.continued_execution_run_id:
            return found
        run_id = started.continued_execution_run_id


def _local_activity(event: HistoryEvent) -> tuple[str, float] | None:
    """A local activity's marker as (activity type, completion time); None for other markers."""
    attributes = event.marker_recorded_event_attributes
    if attributes.marker_name != "core_local_activity" or "data" not in attributes.details:
        return None
    data = json.loads(attributes.details["data"].payloads[0].data)
    done = data["complete_time"]
    return data["activity_type"], done["seconds"] + done["nanos"] / 1e9


@dataclass
class _Run:
    """What one run's history says, batch by batch."""

    segments: dict[str, list[float]] = field(default_factory=dict)
    once: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.segments.setdefault(name, []).append(seconds)


def _one_run(events: Sequence[HistoryEvent], first_run: bool, found: _Run) -> None:
    kinds = EventType
    started_at = event_seconds(events[0])
    done: float | None = None  # the last batch's completion
    task_started: float | None = None
    locals_done: list[tuple[str, float]] = []
    scheduled: dict[int, float] = {}
    begun: dict[int, float] = {}
    batches = 0
    for event in events:
        at, kind = event_seconds(event), event.event_type
        if kind == kinds.EVENT_TYPE_WORKFLOW_TASK_STARTED and task_started is None:
            task_started = at
        elif kind == kinds.EVENT_TYPE_MARKER_RECORDED:
            local = _local_activity(event)
            if local is not None:
                locals_done.append(local)
        elif kind == kinds.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            name = event.activity_task_scheduled_event_attributes.activity_type.name
            if not name.endswith(".sweep"):
                continue
            scheduled[event.event_id] = at
            if done is None:
                if first_run and not batches:
                    found.once[BEFORE] = at - started_at
            elif task_started is not None:
                found.add(QUEUED_WFT, task_started - done)
                previous = task_started
                for name, completed in locals_done:
                    found.add(f"{name} (local activity)", completed - previous)
                    previous = completed
                found.add(REST, at - previous)
        elif kind == kinds.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            attributes = event.activity_task_started_event_attributes
            if attributes.scheduled_event_id in scheduled:
                begun[attributes.scheduled_event_id] = at
        elif kind == kinds.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            key = event.activity_task_completed_event_attributes.scheduled_event_id
            if key not in scheduled:
                continue
            start = begun.get(key, scheduled[key])
            if first_run and not batches:
                found.once[FIRST_RAN] = at - start
            else:
                found.add(QUEUED, start - scheduled[key])
                found.add(RAN, at - start)
                if done is not None:
                    found.add(CYCLE, at - done)
            batches += 1
            done, task_started, locals_done = at, None, []
        elif kind == kinds.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED and done is not None:
            found.once[AFTER] = at - done


async def where_time_goes(temporal: TemporalClient, workflow_id: str) -> dict[str, float]:
    """Mean milliseconds per batch of each segment of a batch's cycle (the first batch, whose
    cycle starts with the workflow, apart), then what happens once, in milliseconds."""
    found = _Run()
    runs = await histories(temporal, workflow_id)
    for index, events in enumerate(runs):
        _one_run(events, index == 0, found)
    last = (QUEUED, RAN, CYCLE)
    order = [name for name in found.segments if name not in last] + list(last)
    figures = {
        name: statistics.fmean(values) * 1000
        for name in order
        if (values := found.segments.get(name))
    }
    figures.update({name: seconds * 1000 for name, seconds in found.once.items()})
    return figures
