"""Key-service benchmark: encrypt/decrypt cost, rewrap throughput and the codec's cost, each
against a raw floor measured in the same run.

Run it after `scripts/stack up`:

    .venv/bin/python bench/keys.py [--values 20000] [--deks 50000] [--workflows 100]
                                   [--pairs 60] [--json FILE] [--strict]

1. Encrypt and decrypt, microseconds per value: `KeyService.encrypt` / `decrypt` of a 64-byte
   field for 100 subjects in turn (warm: data keys unwrapped and cached, encryption budgets
   reserved, as in a service's steady state) against bare `AESGCM.encrypt` / `decrypt` of the
   same values with a random 96-bit nonce and the same associated data.
2. Rewrap throughput, data keys per second, on `--deks` data keys in a PostgreSQL database of
   this run's own (created on the stack's server and dropped at the end):
   - Lethe: the `KeyRotationWorkflow` on the stack's Temporal server with a control worker in
     this process, from the start of the workflow to the end of its rewrap phase (the progress
     query, polled every 50 ms, leaves `rewrapping`); the workflow is then terminated (what
     follows is the settling wait, the minimum-version raise and a grace period of days);
   - floor: the same reads and writes without Temporal or Lethe's classes: select a batch of
     keys wrapped by the old KEK (keyset pagination), unwrap and wrap each with AESGCM, update
     the batch in one transaction, over the same number of keys, same batch size, same driver.
3. Workflow throughput with and without the payload codec, on a Temporal dev server of this
   run's own (in memory, so history left on the stack's server by earlier runs cannot slow
   either side) with two clients and two workers in this process: one with Lethe's data
   converter (pydantic + AES-GCM codec on the key service's ring), one with the same converter
   without the codec. `--pairs` pairs of bursts of `--workflows` small workflows (one activity
   each, a 1 KiB pydantic input, as Lethe's requests are; unsandboxed, so the codec's share is
   not diluted by the sandbox) started at once and awaited; the two bursts of a pair run back
   to back and the first alternates, so the server's drift falls on both sides. The cost is the
   mean over pairs of 1 - with/without, with a 95% confidence interval (bootstrap). Also
   printed: CPU per workflow of this process and the server (/proc), and the CPU the codec
   itself spends (thread CPU time inside encode and decode).

The targets: rotation at least 50% of its raw floor; the codec costs at most 5% of workflow
throughput, judged by the upper end of its 95% interval so that noise cannot pass it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table
from sqlalchemy import bindparam, insert, select, text, tuple_, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload
from temporalio.client import Client as TemporalClient
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import PayloadCodec
from temporalio.worker import Worker

from lethe.codec.converter import codec_from_settings, data_converter
from lethe.contracts import Subject
from lethe.kernel.config import Settings, load_env_file, load_settings
from lethe.kernel.database import dispose_all
from lethe.keys import store as key_store
from lethe.keys.kek import LocalKekProvider
from lethe.keys.rotation import RotationRequest
from lethe.keys.service import DEK_BYTES, KeyService, dek_aad, place
from lethe.sdk.rotation import rotation_progress, start_rotation
from lethe.temporal.connection import connect
from lethe.temporal.embedded import start_dev_server
from lethe.worker import build_control_worker

ROOT = Path(__file__).resolve().parents[1]
STACK_ENV = ROOT / ".stack" / "env"
TARGET_REWRAP_RATIO = 0.5
TARGET_CODEC_COST = 0.05
BATCH = 1000
WARMUP_WORKFLOWS = 20
console = Console()


class BenchError(Exception):
    """The benchmark cannot run or its result is invalid."""


# --- 1. encrypt and decrypt -------------------------------------------------------------------


class PerValue(BaseModel):
    """Microseconds per value: Lethe and the bare AESGCM floor."""

    lethe_encrypt_us: float
    floor_encrypt_us: float
    lethe_decrypt_us: float
    floor_decrypt_us: float


async def per_value(keys: KeyService, values: int) -> PerValue:
    """Encrypt and decrypt `values` fields for 100 subjects, warm, against bare AESGCM."""
    subjects = [Subject(tenant="bench", subject_id=f"s{n}") for n in range(100)]
    field, where = secrets.token_bytes(64), place("kafka", "bench-events", "email")
    for subject in subjects:  # warm: keys made, unwrapped and cached
        await keys.decrypt(await keys.encrypt(subject, field, where), where)
    begun = time.perf_counter()
    sealed = [await keys.encrypt(subjects[n % 100], field, where) for n in range(values)]
    lethe_encrypt = time.perf_counter() - begun
    begun = time.perf_counter()
    for value in sealed:
        await keys.decrypt(value, where)
    lethe_decrypt = time.perf_counter() - begun

    ciphers = [AESGCM(os.urandom(32)) for _ in range(100)]
    begun = time.perf_counter()
    bare = []
    for n in range(values):
        nonce = os.urandom(12)
        bare.append((nonce, ciphers[n % 100].encrypt(nonce, field, where)))
    floor_encrypt = time.perf_counter() - begun
    begun = time.perf_counter()
    for n, (nonce, body) in enumerate(bare):
        ciphers[n % 100].decrypt(nonce, body, where)
    floor_decrypt = time.perf_counter() - begun
    us = 1e6 / values
    return PerValue(
        lethe_encrypt_us=lethe_encrypt * us,
        floor_encrypt_us=floor_encrypt * us,
        lethe_decrypt_us=lethe_decrypt * us,
        floor_decrypt_us=floor_decrypt * us,
    )


# --- 2. rewrap --------------------------------------------------------------------------------


async def seed_deks(keys: KeyService, count: int) -> None:
    """`count` data keys (one per subject) wrapped by the current KEK, inserted in bulk."""
    provider = keys.provider
    kek = await provider.current_version()
    rows = []
    for n in range(count):
        ref = f"{n:032x}"
        wrapped = await provider.wrap(kek, os.urandom(DEK_BYTES), dek_aad(ref, 1))
        rows.append(
            {
                "subject_ref": ref,
                "version": 1,
                "tenant": "bench",
                "kek_version": kek,
                "wrapped": wrapped,
                "encryptions": 0,
                "created_at": datetime.now(UTC),
            }
        )
    async with keys.engine.begin() as conn:
        for start in range(0, len(rows), 5000):
            await conn.execute(insert(key_store.data_keys), rows[start : start + 5000])


async def floor_rewrap(engine: AsyncEngine, old: AESGCM, new: AESGCM, target: int) -> int:
    """The rewrap without Lethe: keyset-paged select, AESGCM unwrap and wrap, batched update."""
    table = key_store.data_keys
    after: tuple[str, int] | None = None
    done = 0
    statement = (
        update(table)
        .where(
            table.c.subject_ref == bindparam("ref"),
            table.c.version == bindparam("ver"),
            table.c.kek_version == bindparam("old_kek"),
        )
        .values(kek_version=bindparam("new_kek"), wrapped=bindparam("new_wrapped"))
    )
    while True:
        query = select(table).where(table.c.kek_version < target)
        if after is not None:
            query = query.where(tuple_(table.c.subject_ref, table.c.version) > tuple_(*after))
        query = query.order_by(table.c.subject_ref, table.c.version).limit(BATCH)
        async with engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        if not rows:
            return done
        params = []
        for row in rows:
            aad = dek_aad(row.subject_ref, row.version)
            key = old.decrypt(row.wrapped[:12], row.wrapped[12:], aad)
            nonce = os.urandom(12)
            params.append(
                {
                    "ref": row.subject_ref,
                    "ver": row.version,
                    "old_kek": row.kek_version,
                    "new_kek": target,
                    "new_wrapped": nonce + new.encrypt(nonce, key, aad),
                }
            )
        async with engine.begin() as conn:
            await conn.execute(statement, params)
        done += len(rows)
        after = (rows[-1].subject_ref, rows[-1].version)


async def lethe_rewrap(settings: Settings, expected: int) -> float:
    """Data keys per second that `KeyRotationWorkflow` rewraps, from its start to the end of
    its rewrap phase, with a control worker in this process; the workflow is then ended."""
    client = await connect(settings)
    request = RotationRequest(batch_size=BATCH, grace=timedelta(days=1), requested_by="bench")
    async with build_control_worker(client, settings):
        begun = time.perf_counter()
        handle, joined = await start_rotation(client, settings.control_queue, request)
        if joined:
            raise BenchError("a key rotation was already running on this run's control queue")
        try:
            while True:
                progress = await rotation_progress(client, handle.id)
                if progress.phase not in ("creating", "rewrapping"):
                    break
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - begun
        finally:
            await handle.terminate("benchmark over")
    if progress.rewrapped < expected:
        raise BenchError(f"the rotation rewrapped {progress.rewrapped} of {expected} keys")
    return progress.rewrapped / elapsed


# --- 3. the codec's cost ----------------------------------------------------------------------


class Ping(BaseModel):
    """A request-sized workflow input."""

    note: str
    items: list[str]


@activity.defn(name="bench.ping")
async def ping(request: Ping) -> Ping:
    """Echo the input."""
    return request


@workflow.defn(name="BenchPing", sandboxed=False)
class PingWorkflow:
    """One activity, its input echoed back."""

    @workflow.run
    async def run(self, request: Ping) -> Ping:
        """Call the activity once."""
        return await workflow.execute_activity(
            ping, request, start_to_close_timeout=timedelta(seconds=60)
        )


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its children (the run's Temporal server)."""
    pids = [os.getpid()]
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(OSError):
            pids += [int(child) for child in (task / "children").read_text().split()]
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


class CpuTimedCodec(PayloadCodec):
    """A codec that adds up the CPU time its inner codec spends (this thread's, so time spent
    waiting for the GIL or a core is not counted), for the codec's own share."""

    def __init__(self, inner: PayloadCodec) -> None:
        self.inner = inner
        self.seconds = 0.0

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Encode through the inner codec, timed."""
        begun = time.thread_time()
        try:
            return await self.inner.encode(payloads)
        finally:
            self.seconds += time.thread_time() - begun

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Decode through the inner codec, timed."""
        begun = time.thread_time()
        try:
            return await self.inner.decode(payloads)
        finally:
            self.seconds += time.thread_time() - begun


@dataclasses.dataclass
class Side:
    """One converter's client and the task queue its worker polls."""

    client: TemporalClient
    queue: str


async def burst(side: Side, count: int, request: Ping) -> tuple[float, float]:
    """`count` workflows started at once and awaited: workflows per second, and the CPU
    milliseconds per workflow of this process and the run's Temporal server."""
    begun, cpu_begun = time.perf_counter(), cpu_seconds()
    handles = await asyncio.gather(
        *(
            side.client.start_workflow(
                PingWorkflow.run,
                request,
                id=f"{side.queue}-{uuid.uuid4().hex}",
                task_queue=side.queue,
            )
            for _ in range(count)
        )
    )
    results = await asyncio.gather(*(handle.result() for handle in handles))
    rate = count / (time.perf_counter() - begun)
    cpu_ms = (cpu_seconds() - cpu_begun) * 1000 / count
    if any(result != request for result in results):
        raise BenchError("a workflow returned something other than its input")
    return rate, cpu_ms


def mean_interval(values: Sequence[float], resamples: int = 10_000) -> tuple[float, float]:
    """A 95% confidence interval for the mean of `values` (percentile bootstrap, fixed seed)."""
    rng = random.Random(0)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


class CodecCost(BaseModel):
    """Workflow throughput and CPU with and without the codec, burst by burst (`rates_with[i]`
    and `rates_without[i]` ran back to back), and what the comparison gives."""

    workflows_per_burst: int
    rates_with: list[float]
    rates_without: list[float]
    cpu_ms_with: list[float]
    """CPU per workflow, this process (clients and workers) and the Temporal server."""
    cpu_ms_without: list[float]
    cost: float
    """The share of throughput the codec costs: the mean over pairs of 1 - with/without."""
    cost_low: float
    cost_high: float
    """The 95% confidence interval of `cost`."""
    cpu_cost: float
    """The same from CPU per workflow: the mean over pairs of 1 - without/with."""
    codec_cpu_ms_per_workflow: float
    """CPU the codec itself spent per workflow (client and workers, encode and decode)."""


async def codec_cost(count: int, pairs: int) -> CodecCost:
    """Run `pairs` pairs of bursts of `count` workflows, one of each pair with the codec and
    one without, on a dev server of this run's own (the first of each pair alternates)."""
    settings = load_settings()
    timed = CpuTimedCodec(await codec_from_settings(settings))
    request = Ping(note="x" * 200, items=[secrets.token_hex(16) for _ in range(24)])
    async with await start_dev_server(pydantic_data_converter) as env:
        address = env.client.service_client.config.target_host
        sides = {
            name: Side(
                await TemporalClient.connect(address, data_converter=converter),
                f"bench-codec-{name}-{uuid.uuid4().hex[:8]}",
            )
            for name, converter in (
                ("with", data_converter(timed)),
                ("without", dataclasses.replace(pydantic_data_converter)),
            )
        }
        rates: dict[str, list[float]] = {"with": [], "without": []}
        cpu: dict[str, list[float]] = {"with": [], "without": []}
        async with contextlib.AsyncExitStack() as workers:
            for side in sides.values():
                await workers.enter_async_context(
                    Worker(
                        side.client,
                        task_queue=side.queue,
                        workflows=[PingWorkflow],
                        activities=[ping],
                    )
                )
                await burst(side, WARMUP_WORKFLOWS, request)
            timed.seconds = 0.0
            for pair in range(pairs):
                for name in ("with", "without") if pair % 2 == 0 else ("without", "with"):
                    rate, cpu_ms = await burst(sides[name], count, request)
                    rates[name].append(rate)
                    cpu[name].append(cpu_ms)
    pairwise = zip(rates["with"], rates["without"], strict=True)
    costs = [1 - with_ / without for with_, without in pairwise]
    low, high = mean_interval(costs)
    cpu_pairs = zip(cpu["with"], cpu["without"], strict=True)
    return CodecCost(
        workflows_per_burst=count,
        rates_with=rates["with"],
        rates_without=rates["without"],
        cpu_ms_with=cpu["with"],
        cpu_ms_without=cpu["without"],
        cost=statistics.fmean(costs),
        cost_low=low,
        cost_high=high,
        cpu_cost=statistics.fmean(1 - without / with_ for with_, without in cpu_pairs),
        codec_cpu_ms_per_workflow=timed.seconds * 1000 / (pairs * count),
    )


# --- the run ----------------------------------------------------------------------------------


class Result(BaseModel):
    """What `--json` writes."""

    per_value: PerValue
    deks: int
    rewrap_lethe_per_s: float
    rewrap_floor_per_s: float
    codec: CodecCost
    rewrap_met: bool
    codec_met: bool


async def fresh_database(server_url: str, name: str) -> str:
    """Create database `name` on the server of `server_url`; the URL of the new database."""
    url = make_url(server_url)
    admin = create_async_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    await admin.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


async def drop_database(server_url: str, name: str) -> None:
    """Drop a database this run created."""
    admin = create_async_engine(
        make_url(server_url).set(database="postgres"), isolation_level="AUTOCOMMIT"
    )
    async with admin.connect() as conn:
        await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    await admin.dispose()


async def run(values: int, deks: int, workflows: int, pairs: int) -> Result:
    """Set up, measure the three parts, clean up."""
    load_env_file(STACK_ENV)
    settings = load_settings()
    server_url = settings.key_store_url
    if make_url(server_url).get_backend_name() != "postgresql":
        raise BenchError("LETHE_KEYS_STORE_URL must point at the stack's PostgreSQL")
    name = f"lethe_keys_bench_{secrets.token_hex(4)}"
    url = await fresh_database(server_url, name)
    try:
        engine = await key_store.key_engine(url)
        provider = LocalKekProvider(engine, settings.keys_master_key_bytes)
        keys = KeyService(engine, provider, settings.subject_key_bytes)
        console.print(f"1. encrypt/decrypt: {values} values")
        measured = await per_value(keys, values)

        console.print(f"2. rewrap: seeding {deks} data keys in {name}")
        await seed_deks(keys, deks)
        old_version = await provider.current_version()
        target = await provider.create_version()
        # The floor needs the bare KEKs; only the local provider's internals hand them out.
        old, new = await provider._kek(old_version), await provider._kek(target)
        begun = time.perf_counter()
        floored = await floor_rewrap(engine, old, new, target)
        floor_rate = floored / (time.perf_counter() - begun)
        if floored < deks:
            raise BenchError(f"the floor rewrapped {floored} of {deks} keys")
        os.environ.update(
            LETHE_KEYS_STORE_URL=url,
            LETHE_STORE_URL=url,  # the rotation's ledger entries die with the run's database
            LETHE_CONTROL_QUEUE=f"lethe-bench-keys-{name.rsplit('_', 1)[-1]}",
        )
        console.print(f"   the floor: {floor_rate:.0f}/s; now KeyRotationWorkflow on {deks} keys")
        lethe_rate = await lethe_rewrap(load_settings(), deks)

        console.print(
            f"3. codec cost: {pairs} pairs of bursts of {workflows} workflows, with and without"
        )
        cost = await codec_cost(workflows, pairs)
    finally:
        await dispose_all()
        await drop_database(server_url, name)
    return Result(
        per_value=measured,
        deks=deks,
        rewrap_lethe_per_s=lethe_rate,
        rewrap_floor_per_s=floor_rate,
        codec=cost,
        rewrap_met=lethe_rate >= TARGET_REWRAP_RATIO * floor_rate,
        codec_met=cost.cost_high <= TARGET_CODEC_COST,
    )


def show(result: Result) -> None:
    """The comparison table and the verdicts."""
    table = Table(title="Key service: Lethe against the raw floor")
    for heading in ("", "Lethe", "floor", "Lethe / floor"):
        table.add_column(heading, justify="right" if heading else "left")
    pv = result.per_value
    for label, lethe, floor in (
        ("encrypt, µs per value", pv.lethe_encrypt_us, pv.floor_encrypt_us),
        ("decrypt, µs per value", pv.lethe_decrypt_us, pv.floor_decrypt_us),
    ):
        table.add_row(label, f"{lethe:.1f}", f"{floor:.1f}", f"{lethe / floor:.1f}x")
    lethe_rewrap = result.rewrap_lethe_per_s
    table.add_row(
        f"rewrap, {result.deks} DEKs (/s)",
        f"{lethe_rewrap:.0f}",
        f"{result.rewrap_floor_per_s:.0f}",
        f"{lethe_rewrap / result.rewrap_floor_per_s:.2f}x",
    )
    codec = result.codec
    with_, without = statistics.median(codec.rates_with), statistics.median(codec.rates_without)
    table.add_row(
        f"workflows/s, codec on / off (median of {len(codec.rates_with)})",
        f"{with_:.1f}",
        f"{without:.1f}",
        f"{with_ / without:.3f}x",
    )
    console.print(table)
    cpu_with = statistics.median(codec.cpu_ms_with)
    console.print(
        f"codec bursts of {codec.workflows_per_burst} (/s), with: "
        f"{', '.join(f'{r:.1f}' for r in codec.rates_with)}; without: "
        f"{', '.join(f'{r:.1f}' for r in codec.rates_without)}.\n"
        f"CPU per workflow, this process and the server (median): with {cpu_with:.1f} ms, "
        f"without {statistics.median(codec.cpu_ms_without):.1f} ms, a cost of "
        f"{codec.cpu_cost:.1%} (mean over pairs). The codec itself: "
        f"{codec.codec_cpu_ms_per_workflow:.2f} ms per workflow, "
        f"{codec.codec_cpu_ms_per_workflow / cpu_with:.1%} of that CPU."
    )
    console.print(
        f"target codec cost <= {TARGET_CODEC_COST:.0%} (the upper end of the 95% interval): "
        f"{'met' if result.codec_met else 'NOT met'} ({codec.cost:.1%}, 95% interval "
        f"{codec.cost_low:.1%} to {codec.cost_high:.1%})"
    )
    console.print(
        f"target rotation >= {TARGET_REWRAP_RATIO:.0%} of floor: "
        f"{'met' if result.rewrap_met else 'NOT met'} "
        f"({lethe_rewrap / result.rewrap_floor_per_s:.0%})"
    )


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
    """Entry point: parse options, run, print, exit 1 on a missed target with --strict."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--values", type=at_least(100), default=20_000)
    parser.add_argument("--deks", type=at_least(BATCH), default=50_000)
    parser.add_argument("--workflows", type=at_least(1), default=100)
    parser.add_argument("--pairs", type=at_least(2), default=60)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--strict", action="store_true")
    args = parser.parse_args(argv)
    try:
        result = asyncio.run(run(args.values, args.deks, args.workflows, args.pairs))
    except BenchError as exc:
        console.print(f"[red]bench failed:[/red] {exc}")
        return 2
    show(result)
    if args.json:
        args.json.write_text(json.dumps(result.model_dump(), indent=2))
    missed = not (result.codec_met and result.rewrap_met)
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)
