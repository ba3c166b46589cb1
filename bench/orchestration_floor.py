"""The orchestration floor: the workflow shape Lethe's erasure must have, with no work in it.

The erasure bench (`bench/erasure.py`) compares Lethe with a raw floor: the same SQL, Redis and
Kafka work done directly, without Temporal. That floor says what the data systems cost; it does
not say what Temporal itself can do on the same machine. This module is the second floor: the
shape the design mandates for the immediate phase, with nothing inside it.

- `FloorErasureWorkflow` (on the control queue, like `ErasureWorkflow` since its patch
  `steps-from-parent`): a local activity that stands for planning, one activity on the region's
  queue (`lethe-<region>`) that stands for the region's preflight, two local activities that
  stand for the ledger and the hold check, one activity per immediate step on the region's
  queue, all in parallel (Lethe runs one erase-and-verify activity per step), and a local
  activity that stands for the ledger write of their outcomes; then it returns, where Lethe
  starts its window timer.
- `floor_noop`, the only activity: it returns its input.

The timeouts and retry policies are Lethe's, so the server keeps the same timers. What the floor
leaves out is not part of the mandated shape: the codec (payloads here are plain JSON through
the default data converter), search attributes, the status query and the work of each activity.
Whatever this shape reaches on a machine bounds what Lethe can reach on it.

The bench starts this module as a worker process, one process for both queues as `worker.py
--region R --control` does:

    python bench/orchestration_floor.py --address HOST:PORT --control-queue Q --region-queue R

It prints `polling <queue>` for each queue once the worker polls it, and ends on SIGTERM or
SIGINT with a clean worker shutdown. The worker's sandbox imports this file again for every
workflow run (as `__temporal_main__`), so nothing runs at import, and what only the worker
process needs is imported through the sandbox's pass-through.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    import argparse
    import contextlib
    import os
    import signal
    import sys
    from collections.abc import Sequence

    from temporalio.client import Client
    from temporalio.worker import Worker

PARENT_WORKFLOW = "FloorErasureWorkflow"
"""The parent's workflow type: what a client starts, on the control queue."""
LOCAL_TIMEOUT = timedelta(seconds=60)
"""Lethe's control-plane local activities' start-to-close timeout (`CONTROL_TIMEOUT`)."""
LOCAL_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=20,
)
STEP_TIMEOUT = timedelta(minutes=10)
"""Lethe's connector activities' start-to-close timeout (`CONNECTOR_TIMEOUT`)."""
STEP_HEARTBEAT = timedelta(seconds=20)
"""Lethe's connector activities' heartbeat timeout (`CONNECTOR_HEARTBEAT`)."""
STEP_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=2),
    maximum_attempts=8,
)
PREFLIGHT_TIMEOUT = timedelta(minutes=2)
"""Lethe's preflight's schedule-to-close timeout (`PREFLIGHT_TIMEOUT`), one attempt."""
SHUTDOWN_GRACE = timedelta(seconds=5)


@dataclass(frozen=True)
class FloorJob:
    """The input: the region's task queue and how many step activities run on it."""

    region_queue: str
    steps: int


@activity.defn(name="floor_noop")
async def floor_noop(value: str) -> str:
    """Do nothing: return the input."""
    return value


async def _local(what: str) -> None:
    await workflow.execute_local_activity(
        floor_noop, what, start_to_close_timeout=LOCAL_TIMEOUT, retry_policy=LOCAL_RETRY
    )


@workflow.defn(name=PARENT_WORKFLOW)
class FloorErasureWorkflow:
    """The erasure workflow's shape: plan, the region's preflight, its steps, the ledger."""

    @workflow.run
    async def run(self, job: FloorJob) -> int:
        await _local("plan")
        await workflow.execute_activity(
            floor_noop,
            "preflight",
            task_queue=job.region_queue,
            schedule_to_close_timeout=PREFLIGHT_TIMEOUT,
            retry_policy=RetryPolicy(maximum_attempts=1),
        )
        await _local("ledger")
        await _local("holds")
        done = await asyncio.gather(
            *(
                workflow.execute_activity(
                    floor_noop,
                    f"step-{index}",
                    task_queue=job.region_queue,
                    activity_id=f"step-{index}",
                    start_to_close_timeout=STEP_TIMEOUT,
                    heartbeat_timeout=STEP_HEARTBEAT,
                    retry_policy=STEP_RETRY,
                )
                for index in range(job.steps)
            )
        )
        await _local("ledger")
        return len(done)


async def serve(address: str, namespace: str, control_queue: str, region_queue: str) -> None:
    """Poll both queues with the default data converter until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    client = await Client.connect(address, namespace=namespace)
    workers = [
        Worker(
            client,
            task_queue=region_queue,
            activities=[floor_noop],
            graceful_shutdown_timeout=SHUTDOWN_GRACE,
        ),
        Worker(
            client,
            task_queue=control_queue,
            workflows=[FloorErasureWorkflow],
            activities=[floor_noop],
            graceful_shutdown_timeout=SHUTDOWN_GRACE,
        ),
    ]
    async with contextlib.AsyncExitStack() as running:
        for worker in workers:
            await running.enter_async_context(worker)
            print(f"polling {worker.task_queue}", flush=True)
        await stop.wait()
        print("shutting down", flush=True)
    print("worker stopped", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the floor's worker until a signal, then end the process.

    The process ends with os._exit after the clean shutdown, as `worker.py` does: the Temporal
    SDK's runtime can crash at interpreter exit, which would turn a clean stop into a failure.
    """
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--address", required=True, help="the Temporal frontend, HOST:PORT")
    parser.add_argument("--namespace", default="default", help="the Temporal namespace")
    parser.add_argument("--control-queue", required=True, help="the parent workflow's queue")
    parser.add_argument("--region-queue", required=True, help="the region's queue (its activities)")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.address, args.namespace, args.control_queue, args.region_queue))
    except RuntimeError as exc:  # the SDK's error when the server cannot be reached
        print(f"orchestration floor: {exc}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
