"""Key-service benchmark: encrypt/decrypt cost, rewrap throughput and the codec's cost, each
against a raw floor measured in the same run.

Run it after `scripts/stack up`:

    .venv/bin/python bench/keys.py [--values 20000] [--deks 50000] [--workflows 300]
                                   [--json FILE] [--strict]

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
3. Workflow throughput with and without the payload codec: `--workflows` small workflows (one
   activity each, a 1 KiB pydantic input, as Lethe's requests are) started at once on the
   stack's server and a worker in this process, once with Lethe's data converter (pydantic +
   AES-GCM codec) and once with the same converter without the codec, back to back, fifteen
   rounds in alternating order; the cost is the median over rounds of 1 - with/without (the
   server slows as its history database grows, so pairs are compared, not totals). The time the
   codec itself spends (encode and decode, timed inside) is printed too, and the CPU per
   workflow of this process and the Temporal server with and without the codec (/proc), a
   steadier figure than throughput on a shared machine.

The targets: rotation at least 50% of its raw floor; the codec costs at most 5% of workflow
throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import shlex
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
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

from lethe import key_store
from lethe.client import connect
from lethe.codec import codec_from_settings, data_converter
from lethe.commands.keys import rotation_progress, start_rotation
from lethe.config import Settings, load_settings
from lethe.contracts import Subject
from lethe.kek import LocalKekProvider
from lethe.keys import DEK_BYTES, KeyService, dek_aad, place
from lethe.rotation import RotationRequest
from lethe.store import dispose_all
from worker import build_control_worker

ROOT = Path(__file__).resolve().parents[1]
STACK_ENV = ROOT / ".stack" / "env"
TARGET_REWRAP_RATIO = 0.5
TARGET_CODEC_COST = 0.05
BATCH = 1000
CODEC_ROUNDS = 15
WARMUP_WORKFLOWS = 5
console = Console()


class BenchError(Exception):
    """The benchmark cannot run or its result is invalid."""


def load_stack_env() -> None:
    """Take the stack's variables from `.stack/env` where the environment lacks them."""
    if STACK_ENV.is_file():
        for line in STACK_ENV.read_text().splitlines():
            name, sep, value = line.removeprefix("export ").partition("=")
            if line.startswith("export ") and sep:
                os.environ.setdefault(name, (shlex.split(value) or [""])[0])


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
    """CPU seconds used so far by this process and the stack's Temporal server (Linux /proc)."""
    pids = [os.getpid()]
    with contextlib.suppress(OSError, ValueError):
        pids.append(int((ROOT / ".stack" / "temporal" / "pid").read_text()))
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


async def workflow_rate(client: TemporalClient, count: int) -> tuple[float, float]:
    """Workflows per second, `count` started at once with a worker in this process, and the
    CPU milliseconds per workflow of this process and the Temporal server together."""
    queue = f"bench-keys-{uuid.uuid4().hex[:8]}"
    request = Ping(note="x" * 200, items=[secrets.token_hex(16) for _ in range(24)])
    async with Worker(client, task_queue=queue, workflows=[PingWorkflow], activities=[ping]):
        for _ in range(WARMUP_WORKFLOWS):
            await client.execute_workflow(
                PingWorkflow.run, request, id=f"{queue}-warm-{uuid.uuid4().hex}", task_queue=queue
            )
        begun, cpu_begun = time.perf_counter(), cpu_seconds()
        handles = await asyncio.gather(
            *(
                client.start_workflow(
                    PingWorkflow.run, request, id=f"{queue}-{n}", task_queue=queue
                )
                for n in range(count)
            )
        )
        results = await asyncio.gather(*(handle.result() for handle in handles))
        rate = count / (time.perf_counter() - begun)
        cpu_ms = (cpu_seconds() - cpu_begun) * 1000 / count
    if any(result != request for result in results):
        raise BenchError("a workflow returned something other than its input")
    return rate, cpu_ms


class TimedCodec(PayloadCodec):
    """A codec that adds up the time its inner codec spends, for the codec's own share."""

    def __init__(self, inner: PayloadCodec) -> None:
        self.inner = inner
        self.seconds = 0.0

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Encode through the inner codec, timed."""
        begun = time.perf_counter()
        try:
            return await self.inner.encode(payloads)
        finally:
            self.seconds += time.perf_counter() - begun

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Decode through the inner codec, timed."""
        begun = time.perf_counter()
        try:
            return await self.inner.decode(payloads)
        finally:
            self.seconds += time.perf_counter() - begun


class CodecCost(BaseModel):
    """Workflow throughput with and without the codec (median of each, and every round; the
    rounds pair up), and the time the codec itself took per workflow, in this process."""

    with_codec: float
    without_codec: float
    rounds_with: list[float]
    rounds_without: list[float]
    cpu_ms_with: list[float]
    """CPU per workflow, this process (client and worker) and the Temporal server, each round."""
    cpu_ms_without: list[float]
    codec_ms_per_workflow: float

    @property
    def cpu_cost(self) -> float:
        """The codec's share of the CPU a workflow costs (median over rounds): on a machine
        that runs out of CPU, the throughput it costs."""
        return 1 - statistics.median(self.cpu_ms_without) / statistics.median(self.cpu_ms_with)

    @property
    def cost(self) -> float:
        """The share of throughput the codec costs: the median over rounds of 1 - with/without,
        each round's pair measured back to back (robust to the server slowing over the run)."""
        pairs = zip(self.rounds_with, self.rounds_without, strict=True)
        return statistics.median(1 - with_ / without for with_, without in pairs)


async def codec_cost(count: int, rounds: int = CODEC_ROUNDS) -> CodecCost:
    """Measure both converters `rounds` times each, in alternating order (so drift in the
    machine's load falls on both), and keep the median of each."""
    settings = load_settings()
    timed = TimedCodec(await codec_from_settings(settings))
    converters = {
        "with": data_converter(timed),
        "without": dataclasses.replace(pydantic_data_converter),
    }
    rates: dict[str, list[float]] = {"with": [], "without": []}
    cpu: dict[str, list[float]] = {"with": [], "without": []}
    for round_ in range(rounds):
        for name in ("with", "without") if round_ % 2 == 0 else ("without", "with"):
            client = await TemporalClient.connect(
                settings.temporal_address,
                namespace=settings.temporal_namespace,
                data_converter=converters[name],
            )
            rate, cpu_ms = await workflow_rate(client, count)
            rates[name].append(rate)
            cpu[name].append(cpu_ms)
    return CodecCost(
        with_codec=statistics.median(rates["with"]),
        without_codec=statistics.median(rates["without"]),
        rounds_with=rates["with"],
        rounds_without=rates["without"],
        cpu_ms_with=cpu["with"],
        cpu_ms_without=cpu["without"],
        codec_ms_per_workflow=timed.seconds * 1000 / (rounds * (count + WARMUP_WORKFLOWS)),
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


async def run(values: int, deks: int, workflows: int) -> Result:
    """Set up, measure the three parts, clean up."""
    load_stack_env()
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

        console.print(f"3. codec cost: {workflows} workflows at once, with and without")
        cost = await codec_cost(workflows)
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
        codec_met=cost.cost <= TARGET_CODEC_COST,
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
    table.add_row(
        "workflows/s, codec on vs off",
        f"{codec.with_codec:.1f}",
        f"{codec.without_codec:.1f}",
        f"{codec.with_codec / codec.without_codec:.3f}x",
    )
    console.print(table)
    share = codec.codec_ms_per_workflow * codec.with_codec / 1000
    console.print(
        f"codec rounds (/s): with {', '.join(f'{r:.1f}' for r in codec.rounds_with)}; without "
        f"{', '.join(f'{r:.1f}' for r in codec.rounds_without)}. The codec itself took "
        f"{codec.codec_ms_per_workflow:.2f} ms per workflow in this process, {share:.1%} of the "
        "wall time at that rate. CPU per workflow (this process and the Temporal server, "
        f"median): with {statistics.median(codec.cpu_ms_with):.1f} ms, without "
        f"{statistics.median(codec.cpu_ms_without):.1f} ms, so the codec costs "
        f"{codec.cpu_cost:.1%} of the CPU"
    )
    console.print(
        f"target codec cost <= {TARGET_CODEC_COST:.0%}: "
        f"{'met' if result.codec_met else 'NOT met'} ({codec.cost:.1%})"
    )
    console.print(
        f"target rotation >= {TARGET_REWRAP_RATIO:.0%} of floor: "
        f"{'met' if result.rewrap_met else 'NOT met'} "
        f"({lethe_rewrap / result.rewrap_floor_per_s:.0%})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse options, run, print, exit 1 on a missed target with --strict."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--values", type=int, default=20_000)
    parser.add_argument("--deks", type=int, default=50_000)
    parser.add_argument("--workflows", type=int, default=300)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--strict", action="store_true")
    args = parser.parse_args(argv)
    try:
        result = asyncio.run(run(args.values, args.deks, args.workflows))
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
