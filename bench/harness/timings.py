"""Where the time goes: a workflow history as timings of its activities and child workflows.

Each activity or child is timed from its scheduling (or initiation) to its start (queued) and
from its start to its close (ran); what the workflow spent besides is workflow-task round trips.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent

from bench.harness.workflows import CLOSED, event_seconds


@dataclass
class Timing:
    """One activity or child workflow: scheduled (or initiated), started, closed."""

    name: str
    scheduled: float
    started: float | None = None
    closed: float | None = None

    @property
    def queued(self) -> float:
        """Scheduled to started: waiting for a worker to poll it."""
        return (self.started or self.scheduled) - self.scheduled

    @property
    def ran(self) -> float:
        """Started to closed."""
        return (self.closed or self.scheduled) - (self.started or self.scheduled)

    @property
    def total(self) -> float:
        """Scheduled to closed."""
        return (self.closed or self.scheduled) - self.scheduled


@dataclass
class Breakdown:
    """A workflow's history up to the event that ends the measurement (or its close)."""

    started: float = 0.0
    ended: float = 0.0
    activities: list[Timing] = field(default_factory=list)
    children: list[Timing] = field(default_factory=list)
    child_ids: list[str] = field(default_factory=list)
    workflow_tasks: int = 0
    signals_in: int = 0
    events: int = 0


def breakdown(
    events: Sequence[HistoryEvent], end: Callable[[HistoryEvent], bool] = lambda _: False
) -> Breakdown:
    """The timings of a history's activities and child workflows, up to the first event `end`
    accepts or the workflow's close, whichever comes first."""
    found = Breakdown()
    by_id: dict[int, Timing] = {}
    for event in events:
        at, kind = event_seconds(event), event.event_type
        if kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            found.started = found.ended = at
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            name = event.activity_task_scheduled_event_attributes.activity_type.name
            by_id[event.event_id] = Timing(name, at)
            found.activities.append(by_id[event.event_id])
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            by_id[event.activity_task_started_event_attributes.scheduled_event_id].started = at
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            by_id[event.activity_task_completed_event_attributes.scheduled_event_id].closed = at
        elif kind == EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED:
            by_id[event.event_id] = Timing("child", at)
            found.children.append(by_id[event.event_id])
        elif kind == EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED:
            attributes = event.child_workflow_execution_started_event_attributes
            by_id[attributes.initiated_event_id].started = at
            found.child_ids.append(attributes.workflow_execution.workflow_id)
        elif kind == EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_COMPLETED:
            attributes_done = event.child_workflow_execution_completed_event_attributes
            by_id[attributes_done.initiated_event_id].closed = at
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
            found.workflow_tasks += 1
        elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            found.signals_in += 1
        found.ended = at
        found.events += 1
        if end(event) or kind in CLOSED:
            break
    return found


def counts(found: list[Breakdown], what: str) -> str:
    """The mean size of these workflows' histories, as a line for a table's caption."""
    if not found:
        return ""
    return (
        f"per {what}: {statistics.fmean(b.events for b in found):.0f} history events, "
        f"{statistics.fmean(b.workflow_tasks for b in found):.0f} workflow tasks, "
        f"{statistics.fmean(len(b.activities) for b in found):.0f} activities, "
        f"{statistics.fmean(b.signals_in for b in found):.0f} signals received"
    )


@dataclass
class Segments:
    """Named durations per request, in seconds, in the order first seen."""

    values: dict[str, list[float]] = field(default_factory=dict)
    note: str = ""

    def add(self, name: str, seconds: float) -> None:
        """Record one request's duration for `name`."""
        self.values.setdefault(name, []).append(seconds)
