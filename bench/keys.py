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
   printed: CPU per workflow of this process and the server (psutil), and the CPU the codec
   itself spends (thread CPU time inside encode and decode).

The targets: rotation at least 50% of its raw floor; the codec costs at most 5% of workflow
throughput, judged by the upper end of its 95% interval so that noise cannot pass it.

This file is the wiring; the parts are in `bench/keys_parts/` and `bench/harness/` (the stack's
environment, the database of the run's own, clean-up, CPU, statistics).
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
import time
from collections.abc import Callable, Sequence

from rich.console import Console
from sqlalchemy.engine import make_url

from bench import BenchError
from bench.harness.cleanup import Cleanup
from bench.harness.databases import postgres_database
from bench.harness.stack import load_stack_env
from bench.keys_parts.codec_cost import codec_cost
from bench.keys_parts.per_value import per_value
from bench.keys_parts.result import TARGET_CODEC_COST, TARGET_REWRAP_RATIO, Result, show
from bench.keys_parts.rewrap import BATCH, floor_rewrap, lethe_rewrap, seed_deks
from lethe.kernel.config import load_settings
from lethe.kernel.database import dispose_all
from lethe.keys import store as key_store
from lethe.keys.kek import LocalKekProvider
from lethe.keys.service import KeyService

console = Console()


async def run(values: int, deks: int, workflows: int, pairs: int) -> Result:
    """Set up, measure the three parts, clean up."""
    load_stack_env()
    settings = load_settings()
    server_url = settings.key_store_url
    if make_url(server_url).get_backend_name() != "postgresql":
        raise BenchError("LETHE_KEYS_STORE_URL must point at the stack's PostgreSQL")
    name = f"lethe_keys_bench_{secrets.token_hex(4)}"
    async with Cleanup(lambda line: console.print(f"[yellow]{line}[/yellow]")) as cleanup:
        url = await cleanup.enter("the database", postgres_database(server_url, name))
        cleanup.undo("the database connections", dispose_all)
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
    return Result(
        per_value=measured,
        deks=deks,
        rewrap_lethe_per_s=lethe_rate,
        rewrap_floor_per_s=floor_rate,
        codec=cost,
        rewrap_met=lethe_rate >= TARGET_REWRAP_RATIO * floor_rate,
        codec_met=cost.cost_high <= TARGET_CODEC_COST,
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
    show(console, result)
    if args.json:
        args.json.write_text(json.dumps(result.model_dump(), indent=2))
    missed = not (result.codec_met and result.rewrap_met)
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)
