"""What a side of the benchmark costs besides its time: the CPU of this process (where the floor
and Lethe's workers run), the Temporal server's, how busy the machine was, and this process's
peak resident memory, sampled while the side runs."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import psutil
from pydantic import BaseModel

from bench.harness.cpu import CpuSample, spent
from bench.harness.stack import temporal_pid

RSS_EVERY = 0.05
"""Seconds between samples of the resident memory."""
MIB = 1024 * 1024


class Cost(BaseModel):
    """One side's elapsed time and the resources it used."""

    seconds: float
    cpu_s: float
    """CPU seconds of this process (user + system)."""
    server_cpu_s: float | None
    """CPU seconds of the stack's Temporal server (shared: an upper bound)."""
    machine_busy: float
    """The share of all cores' time that was not idle."""
    rss_start_mib: float
    rss_peak_mib: float


@dataclass
class Meter:
    """Filled in when the `measured` block ends."""

    cost: Cost | None = None
    _peak: list[int] = field(default_factory=lambda: [0])


@contextlib.asynccontextmanager
async def measured() -> AsyncIterator[Meter]:
    """Time the block, sample this process's memory meanwhile, and take the CPU used."""
    me = psutil.Process()
    pids = {"bench": me.pid}
    server = temporal_pid()
    if server is not None:
        pids["temporal"] = server
    meter = Meter()
    start_rss = me.memory_info().rss
    meter._peak[0] = start_rss
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            meter._peak[0] = max(meter._peak[0], me.memory_info().rss)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RSS_EVERY)

    before = CpuSample.take(pids)
    begun = time.perf_counter()
    sampler = asyncio.create_task(sample())
    try:
        yield meter
    finally:
        elapsed = time.perf_counter() - begun
        stop.set()
        await sampler
        used = spent(before, CpuSample.take(pids))
        meter._peak[0] = max(meter._peak[0], me.memory_info().rss)
        seconds = used.seconds if used else {}
        meter.cost = Cost(
            seconds=elapsed,
            cpu_s=seconds.get("bench", 0.0),
            server_cpu_s=seconds.get("temporal"),
            machine_busy=used.machine_busy if used else 0.0,
            rss_start_mib=start_rss / MIB,
            rss_peak_mib=meter._peak[0] / MIB,
        )
