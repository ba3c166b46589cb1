"""Erasure benchmark: the immediate phase's latency and throughput, against two floors.

Run it after `scripts/stack up`:

    .venv/bin/python bench/erasure.py [--requests 50] [--concurrent 100] [--poll-ms 10]
                                      [--json FILE] [--strict] [--keep-workflows]

Set-up, all uniquely named for this run and removed at the end: three PostgreSQL tables in the
stack's `patients` database (patients, soft-deleted; appointments, pseudonymised; lab results,
pseudonymised through a join), a compacted Kafka topic, Redis keys and a shared hash field, one
subject per request seeded in each, a data map holding all five kinds of system (blob and logs
are deferred-phase steps and are never reached), a policy pack without approval and with a
365-day window, a store database of its own (the ledger is append-only, so it lives and dies
with the run), and a worker process (`worker.py --region bench<id> --control`) on its own
region and control queue; later, the orchestration floor's worker on two queues of its own. A
few warm-up erasures (and warm-up floor runs) come first and are not counted.

What is measured:

1. Latency: requests one after another, each for a different subject. The clock starts just
   before `Client.erase()` and stops at the event time of the workflow's window timer
   (`TimerStarted` with a start-to-fire of a day or more). The workflow starts that timer in
   the same workflow task that sets its state to `waiting_window`, after every immediate step
   has been erased, verified and written to the ledger; the client and the dev server share a
   host and its clock. The status query is polled every 10 ms as well (`--poll-ms`; 0 follows
   the history alone), and its first `waiting_window` answer is reported beside the history
   figure; the run is invalid unless every immediate step then shows `done`,
   `pending_compaction` or `retained`.
2. Throughput: `--concurrent` requests started at once; erasures per second from the first
   `erase()` call to the last window timer. Completion is detected by long-polling each
   workflow's history (no status queries load the worker while it works); each status is
   checked once afterwards.
3. The raw floor, in the same run, on other seeded subjects: the statements the connectors
   issue (the same SQLAlchemy UPDATEs through the same psycopg async driver, one transaction
   per table), Redis SCAN + UNLINK and HDEL, and a Kafka tombstone produce + flush with the
   connector's producer settings, with a subject's systems in parallel as Lethe runs them;
   without Temporal and without verification. Sequentially for latency, all subjects at once
   for throughput.
4. The orchestration floor, in the same run: the workflow shape Lethe's erasure has, with no
   work in it (`bench/orchestration_floor.py`, started as a worker process of its own on two
   queues of this run): a workflow on a control queue with a local activity for planning, one
   activity on a `lethe-<region>` queue for the region's preflight, local activities for the
   ledger and the hold check, one no-op activity per immediate step of the plan on the
   region's queue, in parallel, and a local activity for the ledger write. Warmed up, then one
   after another for latency and `--concurrent` at once for throughput, measured like Lethe
   but to the event time of the workflow's completion (where Lethe starts its window timer),
   with the floor worker's and the server's CPU per erasure. It is what Temporal itself
   manages on this machine for that shape, so a throughput target above it cannot be met here
   by any work done inside the activities; the run says so when it is.
5. Where the time goes, from the histories: per request, the workflow's activities per type
   (queue wait and run time), the time while any of them was scheduled or running, and what is
   left (workflow tasks and local activities). And the CPU time the worker, this process and
   the stack's Temporal server used per erasure (psutil; the server's share includes anyone
   else using it), with how busy the machine was. The same breakdown for the orchestration
   floor, one at a time.

The targets: immediate-phase p95 <= 300 ms one at a time, and >= 20 erasures per second with
100 at once.

This file is the wiring; the parts are in `bench/erasure_parts/` (the sample data, the data map
and policy, the raw floor, the orchestration floor's client, following requests, where the time
goes, the result) and `bench/harness/` (shared with the tests: the stack's environment, the store
database, worker processes, clean-up, CPU, statistics, histories, tables).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, only bench/ is on the path: put the repository first, as pytest does.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import base64
import os
import secrets
import tempfile
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from rich.console import Console
from temporalio.client import Client as TemporalClient

from bench import BenchError
from bench.erasure_parts import raw_floor
from bench.erasure_parts.config import check_plan, write_config
from bench.erasure_parts.erasures import Sample, lethe_latency, lethe_throughput
from bench.erasure_parts.orchestration import FloorWorkerProcess, OrchestrationFloor
from bench.erasure_parts.raw_floor import Floor
from bench.erasure_parts.result import (
    TARGET_P95,
    TARGET_RATE,
    CpuUse,
    Figures,
    Result,
    cpu_use,
    show_result,
)
from bench.erasure_parts.sample_data import (
    FILLER_PATIENTS,
    TENANT,
    Names,
    producer_for,
    seed_all,
)
from bench.erasure_parts.where_time_goes import where_time_goes
from bench.harness.cleanup import Cleanup, remove_tree, stoppable
from bench.harness.cpu import CpuSample
from bench.harness.databases import store_database
from bench.harness.report import show_segments
from bench.harness.stack import StackNotReady, load_stack_env, stack_variable, temporal_pid
from bench.harness.stats import percentile
from bench.harness.worker_process import WorkerDidNotStart, WorkerProcess
from bench.harness.workflows import delete_workflows
from lethe.kernel.config import load_settings
from lethe.kernel.errors import LetheError
from lethe.kernel.regions import task_queue
from lethe.sdk.client import Client
from lethe.temporal.connection import connect

WARMUP = 3
POLL_MS = 10.0
WORKER_START_TIMEOUT = 60.0
WORKER_STOP_TIMEOUT = 30.0
STACK_VARIABLES = (
    "LETHE_STACK_SQL_URL",
    "LETHE_STACK_REDIS_URL",
    "LETHE_STACK_KAFKA_BOOTSTRAP",
    "LETHE_STACK_BLOB_CONNECTION",
    "LETHE_STORE_URL",
    "LETHE_KEYS_MASTER_KEY",
)
"""What the run needs from the stack's environment, checked before anything is made."""
T = TypeVar("T")
console = Console()


@dataclass(frozen=True)
class Subjects:
    """The seeded subjects, each erased once: by Lethe or by the raw floor, warm-up or counted."""

    warm_lethe: list[str]
    warm_floor: list[str]
    latency: list[str]
    floor_latency: list[str]
    burst: list[str]
    floor_burst: list[str]

    @classmethod
    def split(cls, names: Names, requests: int, concurrent: int) -> Subjects:
        """Enough subjects for every phase, in the order they are used."""
        count = 2 * WARMUP + 2 * requests + 2 * concurrent
        cursor = iter([names.subject_id(index) for index in range(count)])

        def take(n: int) -> list[str]:
            return [next(cursor) for _ in range(n)]

        warm_lethe, warm_floor = take(WARMUP), take(WARMUP)
        latency, floor_latency = take(requests), take(requests)
        burst, floor_burst = take(concurrent), take(concurrent)
        return cls(warm_lethe, warm_floor, latency, floor_latency, burst, floor_burst)

    @property
    def all(self) -> list[str]:
        """Every subject."""
        return (
            self.warm_lethe
            + self.warm_floor
            + self.latency
            + self.floor_latency
            + self.burst
            + self.floor_burst
        )


async def with_cpu(pids: dict[str, int], count: int, work: Awaitable[T]) -> tuple[T, CpuUse | None]:
    """Await `work` (`count` requests); what it gave, and the CPU `pids` used per request."""
    before = CpuSample.take(pids)
    done = await work
    return done, cpu_use(before, CpuSample.take(pids), count)


def rate(first: float, samples: list[Sample]) -> float:
    """Requests per second, from the first call to the last request's end."""
    return len(samples) / (max(s.finished_at for s in samples) - first)


def latencies(samples: list[Sample]) -> list[float]:
    """Each request's latency, in seconds."""
    return [s.latency for s in samples]


async def run(
    requests: int,
    concurrent: int,
    poll_ms: float,
    json_path: Path | None,
    *,
    keep_workflows: bool = False,
) -> Result:
    """Set up, measure Lethe and both floors, show where the time goes, clean up."""
    load_stack_env()
    names = Names(secrets.token_hex(4))
    stack = {name: stack_variable(name) for name in STACK_VARIABLES}
    subjects = Subjects.split(names, requests, concurrent)
    filler = [names.filler_id(index) for index in range(FILLER_PATIENTS)]

    async with Cleanup(lambda line: console.print(f"[yellow]{line}[/yellow]")) as cleanup:
        # --- set up: files, store, sample data, the worker ------------------------------------
        workdir = Path(tempfile.mkdtemp(prefix=f"lethe-bench-{names.run}-"))
        cleanup.undo("the work folder", lambda: remove_tree(workdir))
        datamap, pack = write_config(names, workdir)
        steps = check_plan(datamap, pack, names)
        console.print(f"run {names.run}: region {names.region}, queue {names.control_queue}")
        store_url = await cleanup.enter(
            "the store database", store_database(stack["LETHE_STORE_URL"], names.store_database)
        )
        seeded = await seed_all(
            cleanup,
            names,
            subjects.all,
            filler,
            sql_url=stack["LETHE_STACK_SQL_URL"],
            redis_url=stack["LETHE_STACK_REDIS_URL"],
            bootstrap=stack["LETHE_STACK_KAFKA_BOOTSTRAP"],
            blob_connection=stack["LETHE_STACK_BLOB_CONNECTION"],
        )
        console.print(f"seeded {len(subjects.all)} subjects and {len(filler)} filler patients")

        os.environ.update(
            LETHE_DATAMAP=str(datamap),
            LETHE_POLICY=str(pack),
            LETHE_CONTROL_QUEUE=names.control_queue,
            LETHE_STORE_URL=store_url,
            LETHE_SUBJECT_KEY=base64.b64encode(secrets.token_bytes(32)).decode(),
            LETHE_WORKER_SHUTDOWN_GRACE_SECONDS="5",
        )
        settings = load_settings()
        client = Client(await connect(settings), settings)
        started: list[str] = []
        cleanup.undo(
            "the workflows",
            lambda: delete_workflows(
                client.temporal,
                [task_queue(names.region, names.control_queue), names.control_queue],
                started,
                keep=keep_workflows,
            ),
        )
        worker = WorkerProcess(names.region, dict(os.environ), workdir / "worker.log")
        cleanup.undo("the worker", lambda: worker.stop(WORKER_STOP_TIMEOUT))
        await worker.start(WORKER_START_TIMEOUT)

        # --- Lethe ------------------------------------------------------------------------------
        console.print(f"worker pid {worker.pid}; warming up with {WARMUP} erasures")
        started += [client.workflow_id(TENANT, s) for s in subjects.warm_lethe]
        await lethe_latency(client, subjects.warm_lethe, poll_ms)
        server = temporal_pid()
        shared = {"Temporal dev server (shared)": server} if server is not None else {}
        pids = {"worker": worker.pid, "bench (client)": os.getpid(), **shared}

        console.print(f"Lethe: {requests} erasures one after another")
        started += [client.workflow_id(TENANT, s) for s in subjects.latency + subjects.burst]
        samples, cpu_sequential = await with_cpu(
            pids, requests, lethe_latency(client, subjects.latency, poll_ms)
        )
        console.print(f"Lethe: {concurrent} erasures at once")
        (first, burst), cpu_burst = await with_cpu(
            pids, concurrent, lethe_throughput(client, subjects.burst)
        )

        # --- the raw floor ----------------------------------------------------------------------
        console.print("floor: the same work without Lethe or Temporal")
        floor = Floor(
            seeded.engine,
            seeded.tables,
            seeded.redis,
            producer_for(stack["LETHE_STACK_KAFKA_BOOTSTRAP"]),
            names,
        )
        floor_times, floor_rate = await raw_floor.measure(
            floor, subjects.warm_floor, subjects.floor_latency, subjects.floor_burst
        )

        # --- the orchestration floor ------------------------------------------------------------
        console.print(
            f"orchestration floor: the same workflow shape with {steps + 1} no-op activities, "
            f"{requests} one after another, {concurrent} at once"
        )
        shape = OrchestrationFloor(
            TemporalClient(client.temporal.service_client, namespace=client.temporal.namespace),
            names,
            steps,
        )
        cleanup.undo(
            "the orchestration floor's workflows",
            lambda: delete_workflows(
                shape.temporal, shape.queues, shape.started, keep=keep_workflows
            ),
        )
        shape_worker = FloorWorkerProcess(
            names,
            settings.temporal_address,
            settings.temporal_namespace,
            dict(os.environ),
            workdir / "orchestration_floor.log",
        )
        cleanup.undo(
            "the orchestration floor's worker", lambda: shape_worker.stop(WORKER_STOP_TIMEOUT)
        )
        await shape_worker.start(WORKER_START_TIMEOUT)
        await shape.latency([f"floor-{names.run}-warmup-{i}" for i in range(WARMUP)])
        shape_pids = {"floor worker": shape_worker.pid, "bench (client)": os.getpid(), **shared}
        shape_samples, cpu_shape_sequential = await with_cpu(
            shape_pids,
            requests,
            shape.latency([f"floor-{names.run}-{i}" for i in range(requests)]),
        )
        (shape_first, shape_burst), cpu_shape_burst = await with_cpu(
            shape_pids,
            concurrent,
            shape.throughput([f"floor-{names.run}-burst-{i}" for i in range(concurrent)]),
        )
        await shape_worker.stop(WORKER_STOP_TIMEOUT)

        # --- what it comes to -------------------------------------------------------------------
        polled = [s.polled_at - s.called_at for s in samples if s.polled_at is not None]
        lethe_p95, lethe_rate = percentile(latencies(samples), 95), rate(first, burst)
        shape_rate = rate(shape_first, shape_burst)
        result = Result(
            requests=requests,
            concurrent=concurrent,
            lethe=Figures(
                p50=percentile(latencies(samples), 50), p95=lethe_p95, throughput=lethe_rate
            ),
            poll_ms=poll_ms,
            lethe_polled_p50=percentile(polled, 50) if polled else None,
            lethe_polled_p95=percentile(polled, 95) if polled else None,
            lethe_p95_under_load=percentile(latencies(burst), 95),
            floor=Figures(
                p50=percentile(floor_times, 50),
                p95=percentile(floor_times, 95),
                throughput=floor_rate,
            ),
            orchestration=Figures(
                p50=percentile(latencies(shape_samples), 50),
                p95=percentile(latencies(shape_samples), 95),
                throughput=shape_rate,
            ),
            orchestration_steps=steps,
            orchestration_p95_under_load=percentile(latencies(shape_burst), 95),
            p95_met=lethe_p95 <= TARGET_P95,
            throughput_met=lethe_rate >= TARGET_RATE,
            throughput_target_above_orchestration=shape_rate < TARGET_RATE,
            cpu_one_at_a_time=cpu_sequential,
            cpu_at_once=cpu_burst,
            cpu_orchestration_one_at_a_time=cpu_shape_sequential,
            cpu_orchestration_at_once=cpu_shape_burst,
        )
        adds_up = (
            "the first row, the last two before the total and nothing else add up to the total; "
            "an activity type's rows are sums over its activities, which run in parallel"
        )
        for label, group in (("one at a time", samples), (f"{concurrent} at once", burst)):
            parent = await where_time_goes(client.temporal, group)
            show_segments(console, f"Where the time goes, {label}", parent, adds_up)
        parent = await where_time_goes(
            shape.temporal, shape_samples, call="start call", end="completed"
        )
        show_segments(
            console,
            "Where the time goes, orchestration floor one at a time",
            parent,
            f"per request, up to the workflow's completion; {adds_up}",
        )
        show_result(console, result)
        if json_path is not None:
            await asyncio.to_thread(json_path.write_text, result.model_dump_json(indent=2))
        return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: `python bench/erasure.py [--requests N] [--concurrent N] [--json PATH]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=50, help="sequential requests (50)")
    parser.add_argument("--concurrent", type=int, default=100, help="requests at once (100)")
    parser.add_argument(
        "--poll-ms",
        type=float,
        default=POLL_MS,
        help="status-query interval in the latency run (10); 0: follow the history only",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--keep-workflows",
        action="store_true",
        help="terminate the run's workflows but keep their histories, to study them",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is not met")
    args = parser.parse_args(argv)
    if args.requests < 2 or args.concurrent < 1 or args.poll_ms < 0:
        parser.error("--requests must be at least 2, --concurrent at least 1, --poll-ms >= 0")
    try:
        result = asyncio.run(
            stoppable(
                run(
                    args.requests,
                    args.concurrent,
                    args.poll_ms,
                    args.json,
                    keep_workflows=args.keep_workflows,
                )
            )
        )
    except (BenchError, LetheError, StackNotReady, WorkerDidNotStart) as exc:
        console.print(f"[red]bench: {exc}[/red]")
        return 2
    except asyncio.CancelledError:
        console.print("[yellow]bench: stopped; what the run created is removed[/yellow]")
        return 130
    if args.strict and not (result.p95_met and result.throughput_met):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
