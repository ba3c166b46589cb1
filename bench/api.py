"""API benchmark: 50 clients reading erasure status and the audit ledger over HTTP, each against
a floor measured in the same run.

Run it after `scripts/stack up`:

    .venv/bin/python bench/api.py [--clients 50] [--seconds 20] [--pace-ms 1000]
                                  [--entries 10000000] [--keep] [--only status|audit]
                                  [--profile DIR] [--json FILE] [--strict]
    .venv/bin/python bench/api.py --quick      # a small run (~75 s), a smoke check

1. Status. A deployment of the run's own (the erasure benchmark's sample systems, a store
   database, a worker on its own region and control queue) with a policy asking for approval;
   `--requests` erasures (20) submitted and left awaiting approval. `lethe serve` runs as a
   process of its own, and so does a bare FastAPI application with one route answering a
   constant, with the same uvicorn settings. First, one client, one call at a time, times each
   layer of a status read: the health route, `/v1/me` (the token's check), the status, and in
   this process the SDK's status and its Temporal query and describe alone. Then `--clients`
   clients (aiohttp, a session and a connection each, a DPO token each) read
   `GET /v1/erasures/{id}` of a random request, then the same clients read the bare route: back
   to back (each always has one request in flight: the server saturated), then paced (each one
   request every `--pace-ms`, as consoles following a request do). Targets: status p95 <= 50
   ms, and <= 3x the bare route's p95 at the same load.
2. Audit query. A store database of its own with `--entries` ledger entries (10,000,000; five
   tenants, their requests' actions spread evenly over three years; made in SQL, the hashes not
   chained), ANALYZEd; kept between runs with `--keep`, since seeding takes minutes. `lethe
   serve` reaches it as a role without BYPASSRLS (row-level security on). The clients, each an
   auditor of one tenant, ask `GET /v1/ledger?tenant=T&action=A&since=..&until=..` (a random
   action, the middle year, the first page of 50), back to back then paced. The raw floor: the
   statement `ledger.search` sends, caught on its way to psycopg, run directly as the tables'
   owner, one connection, then one per client. The plans (EXPLAIN ANALYZE) are printed.
   Target: p95 <= 100 ms.

Latency runs from the request sent to its body read; a request counts if it was sent in the
window (after the warm-up). The load generator shares the machine's cores with the servers, the
worker, Temporal and PostgreSQL (and whatever else runs): the CPU each process used per answer
and how busy the machine was are printed beside the figures. `--profile DIR` runs each `lethe
serve` under cProfile.

This file is the wiring; the parts are in `bench/api_parts/` (the servers, the load, the status
deployment, the seeded ledger, the audit query and its floor, the result) and `bench/harness/`.
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
from dataclasses import dataclass, replace

from rich.console import Console

from bench import BenchError
from bench.api_parts import audit, ledger_seed
from bench.api_parts.bare import PATH as BARE_PATH
from bench.api_parts.load import Client, drive
from bench.api_parts.result import (
    Result,
    Row,
    audit_verdict,
    percentiles,
    show,
    status_verdicts,
)
from bench.api_parts.servers import ServerDidNotStart, ServerProcess
from bench.api_parts.status import (
    awaiting_approval,
    dpo_tokens,
    where_time_goes,
    write_policy,
)
from bench.erasure_parts.config import write_config
from bench.erasure_parts.sample_data import Names, seed_all
from bench.harness.cleanup import Cleanup, remove_tree, stoppable
from bench.harness.databases import store_database
from bench.harness.report import show_segments
from bench.harness.stack import (
    StackNotReady,
    load_stack_env,
    service_pids,
    stack_variable,
    temporal_pid,
)
from bench.harness.timings import Segments
from bench.harness.worker_process import WorkerDidNotStart, WorkerProcess
from bench.harness.workflows import delete_workflows
from lethe.kernel.config import load_settings
from lethe.kernel.errors import LetheError
from lethe.kernel.regions import task_queue
from lethe.sdk.client import Client as LetheClient
from lethe.temporal.connection import connect

WORKER_START_TIMEOUT = 60.0
STACK_VARIABLES = (
    "LETHE_STACK_SQL_URL",
    "LETHE_STACK_REDIS_URL",
    "LETHE_STACK_KAFKA_BOOTSTRAP",
    "LETHE_STACK_BLOB_CONNECTION",
    "LETHE_STORE_URL",
)
console = Console(width=None if sys.stdout.isatty() else 120)
"""Wide enough for the tables when the output goes to a file."""


@dataclass(frozen=True)
class Options:
    """What a run measures, and how long."""

    clients: int = 50
    seconds: float = 20.0
    warmup: float = 3.0
    pace: float = 1.0
    """Seconds between a paced client's requests; 0: no paced measurement."""
    requests: int = 20
    calls: int = 200
    """Calls of each layer in the one-at-a-time breakdown of a status read."""
    entries: int = 10_000_000
    keep: bool = False
    profile: Path | None = None
    """A folder for cProfile's output of each `lethe serve` (status.prof, audit.prof)."""
    status: bool = True
    audit: bool = True


QUICK = Options(seconds=3.0, warmup=1.0, requests=5, calls=30, entries=200_000)


def _pids(**named: int | None) -> dict[str, int]:
    return {name.replace("_", " "): pid for name, pid in named.items() if pid is not None}


def _trees() -> dict[str, int]:
    found = service_pids()
    return {"PostgreSQL": found["PostgreSQL"]} if "PostgreSQL" in found else {}


async def measure_status(
    cleanup: Cleanup, options: Options, workdir: Path
) -> tuple[list[Row], Segments]:
    """Part 1: where a status read's time goes, one at a time; then status against the bare
    route, back to back and paced."""
    names = Names(secrets.token_hex(4))
    stack = {name: stack_variable(name) for name in STACK_VARIABLES}
    datamap, _ = write_config(names, workdir)
    pack = write_policy(workdir)
    store_url = await cleanup.enter(
        "the store database", store_database(stack["LETHE_STORE_URL"], names.store_database)
    )
    subjects = [names.subject_id(index) for index in range(options.requests)]
    await seed_all(
        cleanup,
        names,
        subjects,
        [],
        sql_url=stack["LETHE_STACK_SQL_URL"],
        redis_url=stack["LETHE_STACK_REDIS_URL"],
        bootstrap=stack["LETHE_STACK_KAFKA_BOOTSTRAP"],
        blob_connection=stack["LETHE_STACK_BLOB_CONNECTION"],
    )
    os.environ.update(
        LETHE_DATAMAP=str(datamap),
        LETHE_POLICY=str(pack),
        LETHE_CONTROL_QUEUE=names.control_queue,
        LETHE_STORE_URL=store_url,
        LETHE_SUBJECT_KEY=base64.b64encode(secrets.token_bytes(32)).decode(),
        LETHE_WORKER_SHUTDOWN_GRACE_SECONDS="5",
    )
    settings = load_settings()
    client = LetheClient(await connect(settings), settings)
    queues = [task_queue(names.region, names.control_queue), names.control_queue]
    cleanup.undo("the workflows", lambda: delete_workflows(client.temporal, queues, []))
    worker = WorkerProcess(names.region, dict(os.environ), workdir / "worker.log")
    cleanup.undo("the worker", lambda: worker.stop(30))
    await worker.start(WORKER_START_TIMEOUT)
    ids = await awaiting_approval(client, subjects)
    console.print(f"status: {len(ids)} requests awaiting approval; worker pid {worker.pid}")
    tokens = await dpo_tokens(store_url, options.clients)
    profile = options.profile / "status.prof" if options.profile else None
    lethe = ServerProcess.lethe(dict(os.environ), workdir / "serve-status.log", profile)
    bare = ServerProcess.bare(dict(os.environ), workdir / "bare.log")
    for server in (lethe, bare):
        cleanup.undo(server.name, server.stop)
        await server.start()
    console.print(f"status: where the time goes, {options.calls} calls of each layer")
    layers = await where_time_goes(lethe.base, tokens[0], client, ids, options.calls)
    pids = _pids(
        lethe_serve=lethe.pid,
        bare_FastAPI=bare.pid,
        bench_clients=os.getpid(),
        worker=worker.pid,
        Temporal=temporal_pid(),
    )
    status_clients = [
        Client({"Authorization": f"Bearer {token}"}, lambda rng: f"/v1/erasures/{rng.choice(ids)}")
        for token in tokens
    ]
    bare_clients = [replace(c, paths=lambda _: BARE_PATH) for c in status_clients]
    paces = [0.0, options.pace] if options.pace else [0.0]
    rows = []
    for pace in paces:
        for name, server, clients in (
            ("status", lethe, status_clients),
            ("bare", bare, bare_clients),
        ):
            rows.append(await status_reads(server, clients, options, name, pace, pids))
    await lethe.stop()
    return rows, layers


async def status_reads(
    server: ServerProcess,
    clients: list[Client],
    options: Options,
    name: str,
    pace: float,
    pids: dict[str, int],
) -> Row:
    """The clients' reads through one server at one pace."""
    how = "back to back" if not pace else f"each every {pace * 1000:.0f} ms"
    console.print(f"{name}: {len(clients)} clients, {how}, {options.seconds:.0f} s")
    load = await drive(
        server.base,
        clients,
        seconds=options.seconds,
        warmup=options.warmup,
        interval=pace,
        pids=pids,
        trees=_trees(),
    )
    return Row.of(name, len(clients), pace, load)


async def audit_reads(
    server: ServerProcess, clients: list[Client], options: Options, name: str
) -> list[Row]:
    """The auditors' reads through one server, back to back, then paced."""
    pids = _pids(lethe_serve=server.pid, bench_clients=os.getpid())
    rows = []
    for pace in [0.0, options.pace] if options.pace else [0.0]:
        how = "back to back" if not pace else f"each every {pace * 1000:.0f} ms"
        console.print(f"{name}: {len(clients)} auditors, {how}, {options.seconds:.0f} s")
        load = await drive(
            server.base,
            clients,
            seconds=options.seconds,
            warmup=options.warmup,
            interval=pace,
            pids=pids,
            trees=_trees(),
        )
        rows.append(Row.of(name, len(clients), pace, load))
    return rows


async def audit_floors(
    dsn: str, statements: dict[str, audit.Statement], window: audit.Window, options: Options
) -> tuple[list[Row], list[str]]:
    """Each statement run directly, one connection then one per client; and their plans."""
    rows, plans = [], []
    for name, statement in statements.items():
        plan = await audit.explain(dsn, statement, window, ledger_seed.TENANTS[1], "step.done")
        plans.append(f"{name}:\n{statement.text}\n{plan}")
        for connections in (1, options.clients):
            console.print(f"{name}: the statement through psycopg, {connections} connection(s)")
            floor = await audit.floor(
                dsn,
                statement,
                window,
                connections=connections,
                seconds=options.seconds,
                warmup=options.warmup,
                pids=_pids(bench_clients=os.getpid()),
                trees=_trees(),
            )
            rows.append(Row.of(name, connections, 0.0, floor))
    return rows, plans


async def measure_audit(
    cleanup: Cleanup, options: Options, workdir: Path
) -> tuple[list[Row], ledger_seed.Seeded, str]:
    """Part 2: the audit query over the seeded ledger through the API, as `ledger.search`
    builds it; its raw floor; and its plan."""
    server_url = stack_variable("LETHE_STORE_URL")
    console.print(f"audit: a store with {options.entries:,} ledger entries")
    if not options.keep:  # undone last: the role once the database with its grants is gone
        cleanup.undo("the API's role", lambda: audit.drop_role(server_url, options.entries))
    seeded = await ledger_seed.seed(
        server_url, options.entries, lambda line: console.print(line), reuse=options.keep
    )
    if not options.keep:
        cleanup.undo(
            "the seeded store",
            lambda: asyncio.to_thread(ledger_seed.drop, server_url, options.entries),
        )
    role_url = await audit.api_role_url(seeded.url, options.entries)
    auditors = await audit.auditor_tokens(seeded.url)
    window = audit.Window.middle_year(seeded.first_at)
    tenants = [ledger_seed.TENANTS[i % len(ledger_seed.TENANTS)] for i in range(options.clients)]
    clients = [
        Client({"Authorization": f"Bearer {auditors[tenant]}"}, audit.paths(window, tenant))
        for tenant in tenants
    ]
    built = await audit.search_statement(seeded.url, window)
    statements = {"audit floor": built}
    variants: dict[str, dict[str, str]] = {"audit": {}}
    env = {**os.environ, "LETHE_STORE_URL": seeded.url, "LETHE_API_STORE_URL": role_url}
    env.pop("LETHE_CONTROL_QUEUE", None)
    rows = []
    for name, extra in variants.items():
        profile = options.profile / f"{name.replace(' ', '-')}.prof" if options.profile else None
        server = ServerProcess.lethe({**env, **extra}, workdir / f"serve-{name}.log", profile)
        cleanup.undo(f"the {name} API server", server.stop)
        await server.start()
        rows += await audit_reads(server, clients, options, name)
        await server.stop()
    floors, plans = await audit_floors(audit.owner_dsn(seeded.url), statements, window, options)
    return rows + floors, seeded, "\n\n".join(plans)


async def run(options: Options, json_path: Path | None) -> Result:
    """Set up, measure what `options` asks, clean up; the result."""
    load_stack_env()
    result = Result(rows=[], verdicts=[])
    async with Cleanup(lambda line: console.print(f"[yellow]{line}[/yellow]")) as cleanup:
        workdir = Path(tempfile.mkdtemp(prefix="lethe-bench-api-"))
        cleanup.undo("the work folder", lambda: remove_tree(workdir))
        if options.status:
            rows, layers = await measure_status(cleanup, options, workdir)
            show_segments(console, "Where a status read's time goes", layers, "one client")
            result.breakdown = {name: percentiles(values) for name, values in layers.values.items()}
            result.rows += rows
            bare = {row.interval_ms: row for row in rows if row.name == "bare"}
            for row in rows:
                if row.name.startswith("status"):
                    result.verdicts += status_verdicts(row, bare[row.interval_ms])
        if options.audit:
            rows, seeded, plan = await measure_audit(cleanup, options, workdir)
            result.rows += rows
            reads = [
                row for row in rows if row.name.startswith("audit") and "floor" not in row.name
            ]
            result.verdicts += [audit_verdict(row) for row in reads]
            result.seeded_entries = seeded.entries
            result.seed_seconds = seeded.seconds
            result.seed_reused = seeded.reused
            result.audit_plan = plan
            console.print("The audit query's plans (tenant-1, step.done), as the owner:")
            console.print(plan, highlight=False, markup=False)
    show(console, result)
    if json_path is not None:
        await asyncio.to_thread(json_path.write_text, result.model_dump_json(indent=2))
    return result


def options_from(argv: Sequence[str] | None) -> tuple[Options, Path | None, bool]:
    """The run's options, the JSON path and --strict, from the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a small run (~75 s)")
    parser.add_argument("--clients", type=int, help="concurrent clients (50)")
    parser.add_argument("--seconds", type=float, help="each measurement's counted time (20)")
    parser.add_argument("--pace-ms", type=float, help="paced clients' interval (1000; 0: none)")
    parser.add_argument("--requests", type=int, help="requests awaiting approval (20)")
    parser.add_argument("--entries", type=int, help="ledger entries seeded (10,000,000)")
    parser.add_argument("--keep", action="store_true", help="keep (and reuse) the seeded store")
    parser.add_argument("--only", choices=("status", "audit"), help="one part only")
    parser.add_argument(
        "--profile", type=Path, help="run each `lethe serve` under cProfile, its output here"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    options = QUICK if args.quick else Options()
    changes: dict[str, object] = {
        name: value
        for name, value in (
            ("clients", args.clients),
            ("seconds", args.seconds),
            ("requests", args.requests),
            ("entries", args.entries),
            ("pace", None if args.pace_ms is None else args.pace_ms / 1000),
        )
        if value is not None
    }
    options = replace(
        options,
        **changes,  # type: ignore[arg-type]
        keep=args.keep,
        profile=args.profile,
        status=args.only in (None, "status"),
        audit=args.only in (None, "audit"),
    )
    if options.clients < 1 or options.seconds <= 0 or options.requests < 1 or options.entries < 1:
        parser.error("--clients, --seconds, --requests and --entries must be positive")
    return options, args.json, args.strict


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: `python bench/api.py [--quick] [--keep] [--json FILE] [--strict]`."""
    options, json_path, strict = options_from(argv)
    try:
        result = asyncio.run(stoppable(run(options, json_path)))
    except (BenchError, LetheError, StackNotReady, WorkerDidNotStart, ServerDidNotStart) as exc:
        console.print(f"[red]bench: {exc}[/red]")
        return 2
    except asyncio.CancelledError:
        console.print("[yellow]bench: stopped; what the run created is removed[/yellow]")
        return 130
    return 1 if strict and not result.met else 0


if __name__ == "__main__":
    raise SystemExit(main())
