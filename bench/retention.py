"""Retention benchmark: Lethe's SQL retention sweep against the same keyset-batched DELETE run
directly, on PostgreSQL, in the same run.

Run it after `scripts/stack up`:

    .venv/bin/python bench/retention.py [--rows 2000000] [--batch 20000] [--lethe-first]
                                        [--timeout 1200] [--json FILE] [--strict]
                                        [--keep-workflows]

Set-up, all named for this run and removed at the end (also after an error or Ctrl-C): a
PostgreSQL database of its own on the stack's server holding one table, `portal_sessions(id
bigint primary key, patient_id text, ip_address text, last_seen_at timestamptz)` with an index
on (last_seen_at, id), `--rows` rows of which half (the even ids) were last seen more than 90
days ago (seeded by one INSERT ... SELECT over generate_series, then vacuumed, analysed and
checkpointed); a store database of its own (Lethe's ledger is append-only); a data map in a
temporary folder mapping the table's `ip_address` to `user.device.ip_address`, dated by
`last_seen_at` as its last activity, in region `eu`; a pack with one limit (`user.device`, 90
days from the last activity, delete); and a control queue of its own (`benchret-<id>-control`,
the region's queue `benchret-<id>-eu`).

Two sides, each on a freshly seeded copy of the same rows, the floor first (`--lethe-first`:
Lethe first), each checked afterwards by SQL: no row past the limit is left and every other row
is.

1. The raw floor: `DELETE FROM portal_sessions WHERE id IN (SELECT id ... WHERE last_seen_at <
   :cutoff AND (last_seen_at, id) > (:d, :k) ORDER BY last_seen_at, id LIMIT :n) RETURNING
   last_seen_at, id`, SQLAlchemy Core over psycopg (Lethe's driver), one transaction a batch,
   the cursor the greatest row returned, until a batch deletes nothing. Timed from the first
   statement to the empty one.
2. Lethe: `RetentionSweepWorkflow` started by `lethe.sdk.retention.start_sweep` and followed by
   `follow` to its report, on the stack's Temporal server, with the control worker
   (`build_control_worker`) and the region's worker (`build_worker` over `Connectors(Clients())`)
   in this process, so this process's CPU is the workers'. Timed from the start call to the
   report: planning, every batch (`sql.sweep` on the region's queue, the holds read before it
   and a ledger entry after it, local activities on the control worker) and the report kept.

Printed: rows deleted per second of each and the ratio, batches, CPU seconds of this process
(the floor; Lethe's workers) and of the Temporal server, how busy the machine was, this
process's peak resident memory (psutil, sampled every 50 ms), and where Lethe's time goes per
batch, from the workflow's history. The target: Lethe at least 70% of the floor's rows per
second; the aim, 85%.

This file is the wiring; the parts are in `bench/retention_parts/` and `bench/harness/`.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, only bench/ is on the path: put the repository first, as pytest does.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import json
import os
import secrets
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from rich.console import Console
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench import BenchError
from bench.harness.cleanup import Cleanup, remove_tree, stoppable
from bench.harness.databases import postgres_database, store_database
from bench.harness.stack import StackNotReady, load_stack_env, stack_variable
from bench.harness.workflows import delete_workflows
from bench.retention_parts.floor import floor_sweep
from bench.retention_parts.measure import measured
from bench.retention_parts.result import Result, Side, result_of, show
from bench.retention_parts.sessions import LIMIT, check_left, check_seeded, expired_count, seed
from bench.retention_parts.sweep import (
    CONNECTION,
    POLICY,
    REGION,
    check_plan,
    lethe_sweep,
    write_datamap,
)
from bench.retention_parts.where_time_goes import where_time_goes
from lethe.contracts import SWEEP_BATCH
from lethe.kernel.config import load_settings
from lethe.kernel.database import dispose_all
from lethe.kernel.errors import LetheError
from lethe.kernel.regions import task_queue
from lethe.temporal.connection import connect

console = Console()


async def fresh_table(engine: AsyncEngine, rows: int) -> None:
    """Seed the table anew and check it: `rows` rows, half of them past the limit."""
    console.print(f"   seeding {rows:,} rows")
    await seed(engine, rows, datetime.now(UTC))
    await check_seeded(engine, rows, datetime.now(UTC) - LIMIT)


async def floor_side(engine: AsyncEngine, rows: int, batch_size: int) -> Side:
    """The raw floor on a fresh table, checked."""
    console.print("the raw floor: the same DELETEs, directly")
    await fresh_table(engine, rows)
    cutoff = datetime.now(UTC) - LIMIT
    async with measured() as meter:
        removed, batches = await floor_sweep(engine, cutoff, batch_size)
    await check_left(engine, rows, cutoff, "the floor")
    assert meter.cost is not None
    console.print(f"   {removed:,} rows in {meter.cost.seconds:.1f} s")
    return Side(removed=removed, batches=batches, cost=meter.cost)


async def run(
    rows: int, batch_size: int, timeout: float, *, lethe_first: bool, keep_workflows: bool
) -> Result:
    """Set up, measure both sides, clean up."""
    load_stack_env()
    server = stack_variable("LETHE_STACK_SQL_URL")
    shared_store = stack_variable("LETHE_STORE_URL")
    run_id = secrets.token_hex(4)
    control = f"benchret-{run_id}-control"
    async with Cleanup(lambda line: console.print(f"[yellow]{line}[/yellow]")) as cleanup:
        url = await cleanup.enter(
            "the run's database", postgres_database(server, f"lethe_ret_bench_{run_id}")
        )
        store = await cleanup.enter(
            "the run's store", store_database(shared_store, f"lethe_ret_store_{run_id}")
        )
        folder = Path(tempfile.mkdtemp(prefix=f"benchret-{run_id}-"))
        cleanup.undo("the data map's folder", lambda: remove_tree(folder))
        datamap = write_datamap(folder)
        check_plan(datamap)
        engine = create_async_engine(url)
        cleanup.undo("the database's connections", engine.dispose)
        os.environ.update(
            {
                CONNECTION: url,
                "LETHE_DATAMAP": str(datamap),
                "LETHE_POLICY": str(POLICY),
                "LETHE_CONTROL_QUEUE": control,
                "LETHE_STORE_URL": store,
            }
        )
        settings = load_settings()
        temporal = await connect(settings)
        cleanup.undo("the store's connections", dispose_all)
        started: list[str] = []
        cleanup.undo(
            "the run's workflows",
            lambda: delete_workflows(
                temporal, [control, task_queue(REGION, control)], started, keep=keep_workflows
            ),
        )

        async def lethe_side() -> Side:
            console.print(f"Lethe: RetentionSweepWorkflow on {control}, workers in this process")
            await fresh_table(engine, rows)
            swept = await lethe_sweep(temporal, settings, batch_size, started, timeout)
            report = swept.report
            task = report.tasks[0] if len(report.tasks) == 1 else None
            if task is None or task.status != "done" or report.removed != expired_count(rows):
                raise BenchError(
                    f"the sweep's report: {[t.model_dump(mode='json') for t in report.tasks]}"
                )
            await check_left(engine, rows, report.as_of - LIMIT, "Lethe")
            console.print(f"   {report.removed:,} rows in {swept.cost.seconds:.1f} s")
            side = Side(removed=report.removed, batches=task.batches, cost=swept.cost)
            side_timings[:] = [await where_time_goes(temporal, swept.run_id)]
            return side

        side_timings: list[dict[str, float]] = []
        if lethe_first:
            lethe = await lethe_side()
            floor = await floor_side(engine, rows, batch_size)
        else:
            floor = await floor_side(engine, rows, batch_size)
            lethe = await lethe_side()
        result = result_of(rows, expired_count(rows), batch_size, floor, lethe)
        return result.model_copy(update={"where_time_goes": side_timings[0]})


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number no smaller than `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse options, run, print, exit 1 on a missed target with --strict (2 when
    the run failed)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=at_least(2), default=2_000_000, help="rows (2,000,000)")
    parser.add_argument(
        "--batch",
        type=at_least(1),
        default=SWEEP_BATCH,
        help=f"rows per batch, both sides ({SWEEP_BATCH})",
    )
    parser.add_argument("--lethe-first", action="store_true", help="measure Lethe first")
    parser.add_argument(
        "--timeout",
        type=at_least(10),
        default=1200,
        help="seconds Lethe's sweep may take before the run fails (1200)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the target is missed")
    parser.add_argument(
        "--keep-workflows",
        action="store_true",
        help="terminate the run's workflow but keep its history, to study it",
    )
    args = parser.parse_args(argv)
    if args.batch > 100_000:
        parser.error("--batch must be at most 100000 (a sweep request's limit)")
    try:
        result = asyncio.run(
            stoppable(
                run(
                    args.rows,
                    args.batch,
                    args.timeout,
                    lethe_first=args.lethe_first,
                    keep_workflows=args.keep_workflows,
                )
            )
        )
    except (BenchError, LetheError, StackNotReady) as exc:
        console.print(f"[red]bench: {exc}[/red]")
        return 2
    except Exception:
        # A driver or server error: the run failed, which is exit 2, not a missed target.
        console.print_exception()
        return 2
    except asyncio.CancelledError:
        console.print("[yellow]bench: stopped; what the run created is removed[/yellow]")
        return 130
    show(console, result)
    if args.json:
        args.json.write_text(json.dumps(result.model_dump(mode="json"), indent=2))
    return 1 if args.strict and not result.target_met else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)
