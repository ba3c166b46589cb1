"""Bulk-erasure benchmark: the immediate phase of one bulk request against the raw batched floor.

Run it after `scripts/stack up`:

    .venv/bin/python bench/bulk.py [--subjects 100000] [--batch-size 1000] [--json FILE]
                                   [--strict] [--keep-workflows]

Set-up, all uniquely named for this run and removed at the end (also after an error or Ctrl-C):
the erasure benchmark's three PostgreSQL tables, compacted Kafka topic, Redis keys and e-mail
hash, empty blob containers, data map (all five kinds of system; blob and logs are deferred
steps, never reached) and policy pack (no approval, a 365-day window), with 2 x N subjects
seeded (and 2,000 filler patients); a store database of its own, and one worker process
(`worker.py --region bench<id> --control`).

What is measured:

1. Lethe: subjects 0 .. N-1 written to a subjects file (CSV: subject_id, email) and submitted
   with `lethe.sdk.bulk.submit` (batches of --batch-size). The clock runs from the submit call
   to the event time of the workflow's window timer, which it starts in the workflow task that
   sets its state to `waiting_window`, after the last immediate batch is erased, verified and
   in the ledger; then the progress query must show every subject settled and none failed.
   History events are summed over every run of the continue-as-new chain; CPU per subject of
   the worker, the Temporal server, this process and the data services (PostgreSQL with its
   backends, Redis, Kafka; psutil), and the worker's peak RSS.
2. The raw floor, in the same run, on subjects N .. 2N-1: per batch, what the connectors do,
   done directly: per table, SELECT ... FOR UPDATE and one UPDATE in a transaction, then the
   verification GROUP BY; Redis TYPE, one SCAN pass for the batch, pipelined EXISTS/HEXISTS,
   UNLINK and HDEL, then the same reads again; Kafka tombstones produced then one flush, then
   the topic's settings and each partition read back. Batches in sequence, the systems (and
   tables) of a batch in parallel, as the workflow runs its steps. Lethe's subjects' Redis keys
   are put back first, so both sides' SCAN passes walk a keyspace of the same size.

Targets: >= 1,000 subjects per second, >= 50% of the raw floor, worker RSS < 500 MB.
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
from collections.abc import Sequence

from rich.console import Console
from sqlalchemy import func, select
from temporalio.api.enums.v1 import EventType

from bench import BenchError
from bench.bulk_parts.batch_split import batch_split
from bench.bulk_parts.chain import Chain
from bench.bulk_parts.floor import BulkFloor
from bench.bulk_parts.lethe_side import PeakRss, delete_chain, run_lethe, write_subjects_file
from bench.bulk_parts.result import (
    TARGET_RATE,
    TARGET_RATIO,
    TARGET_RSS_MB,
    History,
    Result,
    show_result,
)
from bench.bulk_parts.seeding import BulkNames, Seeded, seed_all, seed_redis
from bench.erasure_parts.config import check_plan, write_config
from bench.erasure_parts.result import cpu_use
from bench.harness.cleanup import Cleanup, remove_tree, stoppable
from bench.harness.cpu import CpuSample
from bench.harness.databases import store_database
from bench.harness.report import show_segments
from bench.harness.stack import (
    StackNotReady,
    load_stack_env,
    service_pids,
    stack_variable,
    temporal_pid,
)
from bench.harness.worker_process import WorkerDidNotStart, WorkerProcess
from lethe.contracts import BULK_MAX_BATCH
from lethe.kernel.config import load_settings
from lethe.kernel.errors import LetheError
from lethe.sdk.client import Client
from lethe.temporal.connection import connect

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
console = Console()


def history_of(chain: Chain) -> History:
    """The chain's event counts."""
    return History(
        runs=len(chain.runs),
        events=chain.events,
        workflow_tasks=chain.count(EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED),
        local_activities=chain.count(EventType.EVENT_TYPE_MARKER_RECORDED),
        activities=chain.count(EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED),
        bytes=chain.bytes,
    )


async def check_erased(seeded: Seeded, names: BulkNames, floor_ids: list[str]) -> None:
    """No subject's patient row is left unmarked, and none of the floor's session keys is left."""
    patients = seeded.tables.patients
    async with seeded.engine.connect() as conn:
        left = (
            await conn.execute(
                select(func.count())
                .select_from(patients)
                .where(
                    patients.c.patient_id.like(f"s{names.run}-%"), patients.c.deleted_at.is_(None)
                )
            )
        ).scalar_one()
    pipe = seeded.redis.pipeline(transaction=False)
    for subject_id in floor_ids:
        pipe.exists(f"{names.redis_prefix}:session:{subject_id}")
    keys = sum(int(n) for n in await pipe.execute())
    if left or keys:
        raise BenchError(f"{left} patient row(s) and {keys} floor key(s) were not erased")


async def run(
    subjects: int, batch_size: int, json_path: Path | None, *, keep_workflows: bool = False
) -> Result:
    """Set up, measure Lethe and the raw floor, show where the time goes, clean up."""
    load_stack_env()
    names = BulkNames(secrets.token_hex(4))
    stack = {name: stack_variable(name) for name in STACK_VARIABLES}
    lethe_ids = [names.subject_id(i) for i in range(subjects)]
    floor_ids = [names.subject_id(i) for i in range(subjects, 2 * subjects)]

    async with Cleanup(lambda line: console.print(f"[yellow]{line}[/yellow]")) as cleanup:
        workdir = Path(tempfile.mkdtemp(prefix=f"lethe-bulk-{names.run}-"))
        cleanup.undo("the work folder", lambda: remove_tree(workdir))
        datamap, pack = write_config(names, workdir)
        check_plan(datamap, pack, names)
        console.print(f"run {names.run}: region {names.region}, queue {names.control_queue}")
        store_url = await cleanup.enter(
            "the store database", store_database(stack["LETHE_STORE_URL"], names.store_database)
        )
        console.print(f"seeding {2 * subjects:,} subjects")
        seeded = await seed_all(
            cleanup,
            names,
            2 * subjects,
            sql_url=stack["LETHE_STACK_SQL_URL"],
            redis_url=stack["LETHE_STACK_REDIS_URL"],
            bootstrap=stack["LETHE_STACK_KAFKA_BOOTSTRAP"],
            blob_connection=stack["LETHE_STACK_BLOB_CONNECTION"],
        )
        subjects_file = write_subjects_file(workdir / "subjects.csv", lethe_ids)

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
        worker = WorkerProcess(names.region, dict(os.environ), workdir / "worker.log")
        cleanup.undo("the worker", lambda: worker.stop(WORKER_STOP_TIMEOUT))
        await worker.start(WORKER_START_TIMEOUT)
        server = temporal_pid()
        shared = {"Temporal server (shared)": server} if server is not None else {}
        pids = {"worker": worker.pid, **shared, "bench (client)": os.getpid()}
        services = {f"{name} (shared)": pid for name, pid in service_pids().items()}

        # --- Lethe ------------------------------------------------------------------------------
        console.print(f"Lethe: one bulk request of {subjects:,} subjects (worker {worker.pid})")
        before = CpuSample.take(pids, services)
        async with PeakRss(worker.pid).sampling() as rss:
            lethe = await run_lethe(
                client, subjects_file, subjects, batch_size, timeout=max(600.0, subjects / 50)
            )
        cpu_lethe = cpu_use(before, CpuSample.take(pids, services), subjects)
        cleanup.undo(
            "the bulk request's runs",
            lambda: delete_chain(client.temporal, lethe.bulk_id, keep=keep_workflows),
        )
        console.print(f"Lethe: {lethe.seconds:.1f} s; putting its subjects' Redis keys back")
        await seed_redis(seeded.redis, names, lethe_ids)

        # --- the raw floor ----------------------------------------------------------------------
        console.print(f"floor: the same batches of {subjects:,} subjects, directly")
        floor = BulkFloor(seeded, names)
        floor_pids = {"bench (floor)": os.getpid(), **shared}
        before = CpuSample.take(floor_pids, services)
        floor_seconds = await floor.erase_all(floor_ids, batch_size)
        cpu_floor = cpu_use(before, CpuSample.take(floor_pids, services), subjects)
        await check_erased(seeded, names, floor_ids)

        # --- what it comes to -------------------------------------------------------------------
        history = history_of(lethe.chain)
        lethe_rate, floor_rate = subjects / lethe.seconds, subjects / floor_seconds
        result = Result(
            subjects=subjects,
            batch_size=batch_size,
            batches=lethe.progress.batches,
            lethe_seconds=lethe.seconds,
            lethe_submit_seconds=lethe.submitted_at - lethe.called_at,
            lethe_rate=lethe_rate,
            floor_seconds=floor_seconds,
            floor_rate=floor_rate,
            ratio=lethe_rate / floor_rate,
            history=history,
            history_events_per_1000=history.per_thousand(history.events, subjects),
            cpu_lethe=cpu_lethe,
            cpu_floor=cpu_floor,
            worker_peak_rss_mb=rss.peak / 2**20,
            rate_met=lethe_rate >= TARGET_RATE,
            ratio_met=lethe_rate / floor_rate >= TARGET_RATIO,
            memory_met=rss.peak / 2**20 < TARGET_RSS_MB,
        )
        show_segments(
            console,
            "Where the time goes, per batch (Lethe's history)",
            batch_split(lethe.chain),
            "the activities of a batch run in parallel",
        )
        show_segments(
            console,
            "Where the time goes, per batch (raw floor)",
            floor.segments,
            "the systems of a batch run in parallel",
        )
        show_result(console, result)
        if json_path is not None:
            await asyncio.to_thread(json_path.write_text, result.model_dump_json(indent=2))
        return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: `python bench/bulk.py [--subjects N] [--batch-size N] [--json PATH]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--subjects", type=int, default=100_000, help="subjects per side")
    parser.add_argument("--batch-size", type=int, default=1000, help="subjects per batch")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--keep-workflows", action="store_true", help="terminate the request but keep its runs"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is not met")
    args = parser.parse_args(argv)
    if args.subjects < 1 or not 1 <= args.batch_size <= BULK_MAX_BATCH:
        parser.error(f"--subjects must be at least 1, --batch-size 1 to {BULK_MAX_BATCH}")
    try:
        result = asyncio.run(
            stoppable(
                run(args.subjects, args.batch_size, args.json, keep_workflows=args.keep_workflows)
            )
        )
    except (BenchError, LetheError, StackNotReady, WorkerDidNotStart) as exc:
        console.print(f"[red]bench: {exc}[/red]")
        return 2
    except asyncio.CancelledError:
        console.print("[yellow]bench: stopped; what the run created is removed[/yellow]")
        return 130
    if args.strict and not (result.rate_met and result.ratio_met and result.memory_met):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
