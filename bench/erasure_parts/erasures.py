"""Lethe's erasures as the benchmark runs them: one after another for latency, all at once for
throughput, each followed to the window timer that ends its immediate phase."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client as TemporalClient

from bench import BenchError
from bench.erasure_parts.sample_data import request_for
from bench.harness.workflows import event_seconds, first_event, gather_limited
from lethe.contracts import ErasureRequest, ErasureStatus
from lethe.kernel.errors import LetheError
from lethe.sdk.client import Client

WAIT_TIMEOUT = 300.0
WINDOW_TIMER_SECONDS = 86400
"""The window timer is the first timer of a day or more; hold re-checks would be an hour."""
FINISHED = ("done", "pending_compaction", "retained")


@dataclass
class Sample:
    """One erasure request as the benchmark saw it."""

    workflow_id: str
    called_at: float
    """Wall clock just before `Client.erase()`."""
    polled_at: float | None = None
    """Wall clock of the first status query answering `waiting_window` (latency run only)."""
    timer_at: float | None = None
    """Event time of the window timer: the immediate phase is over (orchestration floor: the
    event time of the parent's completion, the point where Lethe starts its window timer)."""

    @property
    def finished_at(self) -> float:
        """The window timer's (orchestration floor: the completion's) event time."""
        if self.timer_at is None:
            raise BenchError(f"{self.workflow_id} has no window timer yet")
        return self.timer_at

    @property
    def latency(self) -> float:
        """From the `erase()` call to the window timer, in seconds."""
        return self.finished_at - self.called_at


def is_window_timer(event: HistoryEvent) -> bool:
    """The timer the erasure starts when its immediate phase is over (`waiting_window`)."""
    return (
        event.event_type == EventType.EVENT_TYPE_TIMER_STARTED
        and event.timer_started_event_attributes.start_to_fire_timeout.seconds
        >= WINDOW_TIMER_SECONDS
    )


async def window_timer_at(temporal: TemporalClient, workflow_id: str) -> float:
    """Long-poll a workflow's history until its window timer starts; that event's time."""
    event = await first_event(temporal, workflow_id, is_window_timer, WAIT_TIMEOUT)
    if event is None:
        raise BenchError(f"{workflow_id} closed before its immediate phase finished")
    return event_seconds(event)


def check_status(workflow_id: str, status: ErasureStatus) -> None:
    """Every immediate step finished well; otherwise the run is invalid."""
    if status.state != "waiting_window":
        raise BenchError(f"{workflow_id} is {status.state}, not waiting_window")
    bad = [
        f"{step.step_id}: {step.status} {step.detail}"
        for step in status.steps
        if step.phase == "immediate" and step.status not in FINISHED
    ]
    if bad:
        raise BenchError(f"{workflow_id} has unfinished immediate steps: " + "; ".join(bad))


async def poll_until_waiting(client: Client, workflow_id: str, interval: float) -> float:
    """Query the status every `interval` s; the wall-clock time of the first `waiting_window`."""
    deadline = time.monotonic() + WAIT_TIMEOUT
    while time.monotonic() < deadline:
        try:
            status = await client.status(workflow_id)
        except LetheError:
            status = None  # not started yet, or its first workflow task is still running
        seen = time.time()
        if status is not None and status.state == "waiting_window":
            check_status(workflow_id, status)
            return seen
        if status is not None and status.state not in ("planning", "erasing"):
            check_status(workflow_id, status)
        await asyncio.sleep(interval)
    raise BenchError(f"{workflow_id} did not reach waiting_window in {WAIT_TIMEOUT:.0f} s")


async def lethe_latency(client: Client, subjects: list[str], poll_ms: float) -> list[Sample]:
    """Erase the subjects one after another; each waits for its immediate phase.

    With `poll_ms` 0 the wait is a long poll of the history alone, and the status is checked
    once afterwards, so no query competes with the workflow for the worker.
    """
    samples = []
    for subject_id in subjects:
        request = request_for(subject_id)
        called = time.time()
        workflow_id = (await client.erase(request)).workflow_id
        sample = Sample(workflow_id, called)
        if poll_ms > 0:
            sample.polled_at = await poll_until_waiting(client, workflow_id, poll_ms / 1000)
        else:
            sample.timer_at = await window_timer_at(client.temporal, workflow_id)
            check_status(workflow_id, await client.status(workflow_id))
        samples.append(sample)
    timers = await gather_limited(
        10, (window_timer_at(client.temporal, s.workflow_id) for s in samples)
    )
    for sample, timer in zip(samples, timers, strict=True):
        sample.timer_at = timer
    return samples


async def lethe_throughput(client: Client, subjects: list[str]) -> tuple[float, list[Sample]]:
    """Start every erasure at once; the first call's time and each request's sample."""
    requests = [request_for(subject_id) for subject_id in subjects]
    first = time.time()

    async def start(request: ErasureRequest) -> Sample:
        called = time.time()
        return Sample((await client.erase(request)).workflow_id, called)

    samples = list(await asyncio.gather(*(start(request) for request in requests)))
    timers = await asyncio.gather(
        *(window_timer_at(client.temporal, s.workflow_id) for s in samples)
    )
    for sample, timer in zip(samples, timers, strict=True):
        sample.timer_at = timer
    statuses = await gather_limited(10, (client.status(s.workflow_id) for s in samples))
    for sample, status in zip(samples, statuses, strict=True):
        check_status(sample.workflow_id, status)
    return first, samples
