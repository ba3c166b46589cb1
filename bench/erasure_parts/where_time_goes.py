"""Where the time goes, per request: the parent workflow's activities (queued and ran), its
regional child workflow and what is left (workflow-task round trips), which add up to the
total; inside the child, each step's activities. Read from the histories afterwards."""

from __future__ import annotations

from temporalio.client import Client as TemporalClient

from bench.erasure_parts.erasures import Sample, is_window_timer
from bench.harness.timings import Segments, breakdown, counts
from bench.harness.workflows import fetch_histories


async def where_time_goes(
    temporal: TemporalClient,
    samples: list[Sample],
    *,
    call: str = "erase() call",
    end: str = "window timer",
) -> tuple[Segments, Segments, list[str]]:
    """Per request: the parent's segments (they add up) and the child's; the child ids.

    `call` and `end` name where each request's clock starts and stops, for the labels.
    """
    histories = await fetch_histories(temporal, [s.workflow_id for s in samples])
    parents = [breakdown(events, is_window_timer) for events in histories]
    parent_parts, child_parts = Segments(), Segments()
    for sample, found in zip(samples, parents, strict=True):
        parent_parts.add(f"{call} -> workflow started", found.started - sample.called_at)
        accounted = 0.0
        per_name: dict[str, tuple[float, float, int]] = {}
        for timing in found.activities:
            queued, ran, count = per_name.get(timing.name, (0.0, 0.0, 0))
            per_name[timing.name] = (queued + timing.queued, ran + timing.ran, count + 1)
            accounted += timing.total
        for name, (queued, ran, count) in per_name.items():
            parent_parts.add(f"{name} x{count}: queued", queued)
            parent_parts.add(f"{name} x{count}: ran", ran)
        for child in found.children:
            parent_parts.add("regional child: initiated -> started", child.queued)
            parent_parts.add("regional child: started -> parent sees it complete", child.ran)
            accounted += child.total
        parent_parts.add(
            "the rest: workflow-task round trips between them",
            found.ended - found.started - accounted,
        )
        parent_parts.add(f"total ({call} -> {end})", found.ended - sample.called_at)
    child_ids = [child for found in parents for child in found.child_ids]
    children = [
        breakdown(events, is_window_timer) for events in await fetch_histories(temporal, child_ids)
    ]
    for found in children:
        for timing in found.activities:
            child_parts.add(f"{timing.name}: queued", timing.queued)
            child_parts.add(f"{timing.name}: ran", timing.ran)
        child_parts.add("child workflow: started -> completed", found.ended - found.started)
    parent_parts.note = counts(parents, "erasure workflow")
    child_parts.note = counts(children, "regional child")
    return parent_parts, child_parts, child_ids
