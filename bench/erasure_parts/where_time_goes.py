"""Where the time goes, per request: the workflow's activities (queued and ran, per activity
type), the time while at least one of them was scheduled or running, and what is left
(workflow-task round trips and local activities), which add up to the total. Read from the
histories afterwards."""

from __future__ import annotations

from temporalio.client import Client as TemporalClient

from bench.erasure_parts.erasures import Sample, is_window_timer
from bench.harness.timings import Segments, Timing, breakdown, counts
from bench.harness.workflows import fetch_histories


def busy(timings: list[Timing]) -> float:
    """How long at least one of `timings` was scheduled or running (their union)."""
    spans = sorted((t.scheduled, t.scheduled + t.total) for t in timings)
    covered, end = 0.0, float("-inf")
    for begin, until in spans:
        if until > end:
            covered += until - max(begin, end)
            end = until
    return covered


async def where_time_goes(
    temporal: TemporalClient,
    samples: list[Sample],
    *,
    call: str = "erase() call",
    end: str = "window timer",
) -> Segments:
    """Per request, the workflow's segments.

    `call` and `end` name where each request's clock starts and stops, for the labels.
    """
    histories = await fetch_histories(temporal, [s.workflow_id for s in samples])
    parents = [breakdown(events, is_window_timer) for events in histories]
    parent_parts = Segments()
    for sample, found in zip(samples, parents, strict=True):
        parent_parts.add(f"{call} -> workflow started", found.started - sample.called_at)
        per_name: dict[str, tuple[float, float, int]] = {}
        for timing in found.activities:
            queued, ran, count = per_name.get(timing.name, (0.0, 0.0, 0))
            per_name[timing.name] = (queued + timing.queued, ran + timing.ran, count + 1)
        for name, (queued, ran, count) in per_name.items():
            parent_parts.add(f"{name} x{count}: queued (sum)", queued)
            parent_parts.add(f"{name} x{count}: ran (sum)", ran)
        parent_parts.add("activities scheduled or running", busy(found.activities))
        parent_parts.add(
            "the rest: workflow tasks and local activities",
            found.ended - found.started - busy(found.activities),
        )
        parent_parts.add(f"total ({call} -> {end})", found.ended - sample.called_at)
    parent_parts.note = counts(parents, "erasure workflow")
    return parent_parts
