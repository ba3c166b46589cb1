"""Where a bulk request's time goes, per batch, from its history: the `<kind>.erase_batch`
activities (their ids are `<batch>-<step>`), queued and running, and what the workflow spends
between one batch's last activity and the next batch's first (its local activities
`bulk.record_batch` and `bulk.next_batch`, and workflow-task round trips)."""

from __future__ import annotations

from dataclasses import dataclass, field

from temporalio.api.enums.v1 import EventType

from bench.bulk_parts.chain import Chain
from bench.harness.timings import Segments
from bench.harness.workflows import event_seconds

ERASE_BATCH = ".erase_batch"


@dataclass
class _Activity:
    kind: str
    scheduled: float
    started: float = 0.0
    closed: float = 0.0


@dataclass
class _Batch:
    run: int
    activities: list[_Activity] = field(default_factory=list)


def _batches(chain: Chain) -> dict[int, _Batch]:
    """Each batch's erase_batch activities (the last attempt's start when retried)."""
    batches: dict[int, _Batch] = {}
    by_event: dict[int, _Activity] = {}
    for run_index, run in enumerate(chain.runs):
        for event in run:
            at, kind = event_seconds(event), event.event_type
            if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                attributes = event.activity_task_scheduled_event_attributes
                name = attributes.activity_type.name
                if name.endswith(ERASE_BATCH):
                    number = int(attributes.activity_id.split("-", 1)[0])
                    activity = _Activity(name.removesuffix(ERASE_BATCH), at)
                    by_event[event.event_id] = activity
                    batches.setdefault(number, _Batch(run_index)).activities.append(activity)
            elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
                scheduled = event.activity_task_started_event_attributes.scheduled_event_id
                if scheduled in by_event:
                    by_event[scheduled].started = at
            elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
                scheduled = event.activity_task_completed_event_attributes.scheduled_event_id
                if scheduled in by_event:
                    by_event[scheduled].closed = at
        by_event.clear()  # event ids start again in the next run
    return batches


def batch_split(chain: Chain) -> Segments:
    """Per batch: the cycle (first scheduling to the next batch's), its activities' span, the
    slowest queue wait, each kind's longest run, and the gap to the next batch (apart when a
    new run of the chain starts in it)."""
    segments = Segments(note="per batch of the bulk request")
    batches = [b for _, b in sorted(_batches(chain).items())]
    for index, batch in enumerate(batches):
        first = min(a.scheduled for a in batch.activities)
        last = max(a.closed for a in batch.activities)
        end = (
            min(a.scheduled for a in batches[index + 1].activities)
            if index + 1 < len(batches)
            else chain.timer_at
        )
        segments.add("batch cycle", end - first)
        segments.add("erase_batch activities (first scheduled -> last closed)", last - first)
        segments.add("  slowest queue wait", max(a.started - a.scheduled for a in batch.activities))
        for kind in sorted({a.kind for a in batch.activities}):
            ran = max(a.closed - a.started for a in batch.activities if a.kind == kind)
            segments.add(f"  {kind}.erase_batch ran (slowest step)", ran)
        across = index + 1 < len(batches) and batches[index + 1].run != batch.run
        gap = (
            "between batches, across a continue-as-new (and the new run's preflight)"
            if across
            else "between batches (record, next batch, workflow tasks)"
        )
        segments.add(gap, end - last)
    return segments
