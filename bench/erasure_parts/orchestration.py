"""The orchestration floor from the benchmark's side: its worker process, and its parent
workflows started and followed like Lethe's erasures (`bench/orchestration_floor.py` is the
worker, known here only by its script, its workflow type's name and its input's fields)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client as TemporalClient

from bench import BenchError
from bench.erasure_parts.erasures import WAIT_TIMEOUT, Sample
from bench.erasure_parts.sample_data import Names
from bench.harness.worker_process import WorkerProcess
from bench.harness.workflows import event_seconds, first_event
from lethe.kernel.regions import task_queue

FLOOR_WORKFLOW = "FloorErasureWorkflow"
"""The orchestration floor's parent workflow type."""


class FloorWorkerProcess(WorkerProcess):
    """`bench/orchestration_floor.py` on the floor's two queues, as one process."""

    script = "bench/orchestration_floor.py"

    def __init__(
        self, names: Names, address: str, namespace: str, env: dict[str, str], log: Path
    ) -> None:
        """Describe the floor's worker for this run; `start` runs it."""
        super().__init__(names.floor_region, env, log)
        self.address = address
        self.namespace = namespace
        self.control_queue = names.floor_control_queue

    def arguments(self) -> list[str]:
        """The server and the two queues."""
        return [
            "--address",
            self.address,
            "--namespace",
            self.namespace,
            "--control-queue",
            self.control_queue,
            "--region-queue",
            task_queue(self.region, self.control_queue),
        ]

    def queues(self) -> list[str]:
        """The child's queue and the parent's."""
        return [task_queue(self.region, self.control_queue), self.control_queue]


def _is_completion(event: HistoryEvent) -> bool:
    return event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED


async def completed_at(temporal: TemporalClient, workflow_id: str) -> float:
    """Long-poll a workflow's history until it completes; the event time of its completion."""
    event = await first_event(temporal, workflow_id, _is_completion, WAIT_TIMEOUT)
    if event is None:
        raise BenchError(f"{workflow_id} did not complete")
    return event_seconds(event)


@dataclass(frozen=True)
class OrchestrationFloor:
    """Starts the floor's parent workflows (plain payloads: no codec) and remembers their ids."""

    temporal: TemporalClient
    names: Names
    steps: int
    """Activities in the floor's child: the plan's immediate steps."""
    started: list[str] = field(default_factory=list)

    @property
    def queues(self) -> list[str]:
        """The floor's two task queues: the child's and the parent's."""
        control = self.names.floor_control_queue
        return [task_queue(self.names.floor_region, control), control]

    async def start(self, workflow_id: str) -> Sample:
        """Start one floor erasure; the sample's clock starts just before the call."""
        self.started.append(workflow_id)
        called = time.time()
        await self.temporal.start_workflow(
            FLOOR_WORKFLOW,
            {
                "region_queue": task_queue(self.names.floor_region, self.names.floor_control_queue),
                "steps": self.steps,
            },
            id=workflow_id,
            task_queue=self.names.floor_control_queue,
        )
        return Sample(workflow_id, called)

    async def latency(self, workflow_ids: list[str]) -> list[Sample]:
        """Run floor erasures one after another, each to its completion."""
        samples = []
        for workflow_id in workflow_ids:
            sample = await self.start(workflow_id)
            sample.timer_at = await completed_at(self.temporal, workflow_id)
            samples.append(sample)
        return samples

    async def throughput(self, workflow_ids: list[str]) -> tuple[float, list[Sample]]:
        """Start every floor erasure at once; the first call's time and each one's sample."""
        first = time.time()
        samples = list(await asyncio.gather(*(self.start(w) for w in workflow_ids)))
        completions = await asyncio.gather(
            *(completed_at(self.temporal, s.workflow_id) for s in samples)
        )
        for sample, completion in zip(samples, completions, strict=True):
            sample.timer_at = completion
        return first, samples
