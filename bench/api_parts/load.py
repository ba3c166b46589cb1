"""The load: concurrent HTTP clients, each with a session (and a connection) of its own, reading
one kind of path for a while; each answer's latency, from the request sent to its body read.

Clients either send back to back (each always has one request in flight: the server's
saturation) or paced (each sends one request every `interval` seconds, staggered, as consoles
polling a status do). The first `warmup` seconds are not counted.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from bench.harness.cpu import CpuSample, CpuSpent, spent
from bench.harness.stats import percentile

Paths = Callable[[random.Random], str]
"""The path (with its query) a client asks for next."""


@dataclass(frozen=True)
class Client:
    """One client: the headers it sends (its credentials) and the paths it asks for."""

    headers: dict[str, str]
    paths: Paths


@dataclass
class Load:
    """What the clients measured in the counted window."""

    latencies: list[float] = field(default_factory=list)
    """Seconds, of each answer 200 to a request sent inside the window (those still running
    when it closes are waited for)."""
    failures: Counter[str] = field(default_factory=Counter)
    """Other answers (by status) and errors (by type), over the whole run."""
    seconds: float = 0.0
    cpu: CpuSpent | None = None

    @property
    def rate(self) -> float:
        """Requests sent in the window and answered 200, per second of the window."""
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def p(self, q: float) -> float:
        """The q-th percentile latency, seconds."""
        return percentile(self.latencies, q)


async def _one(
    session: aiohttp.ClientSession, path: str, load: Load, counted: tuple[float, float]
) -> None:
    sent = time.perf_counter()
    try:
        async with session.get(path) as answer:
            await answer.read()
            status = answer.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        load.failures[type(exc).__name__] += 1
        return
    done = time.perf_counter()
    if status != 200:
        load.failures[f"HTTP {status}"] += 1
    elif counted[0] <= sent < counted[1]:
        load.latencies.append(done - sent)


async def drive(
    base: str,
    clients: list[Client],
    *,
    seconds: float,
    warmup: float,
    interval: float = 0.0,
    pids: dict[str, int] | None = None,
    trees: dict[str, int] | None = None,
) -> Load:
    """Run every client for `warmup` + `seconds`; the latencies of the last `seconds`, and the
    CPU the processes `pids` (and servers with children `trees`) used in that window."""
    load = Load(seconds=seconds)
    ready = asyncio.Event()
    begin = 0.0

    async def run(index: int, client: Client) -> None:
        rng = random.Random(index)
        async with aiohttp.ClientSession(
            base,
            headers=client.headers,
            connector=aiohttp.TCPConnector(limit=1),
            timeout=aiohttp.ClientTimeout(total=30),
        ) as session:
            await ready.wait()
            counted = (begin + warmup, begin + warmup + seconds)
            next_at = begin + interval * index / len(clients)
            while time.perf_counter() < counted[1]:
                if interval:
                    await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                    next_at += interval
                await _one(session, client.paths(rng), load, counted)

    async def sample_cpu() -> None:
        await asyncio.sleep(warmup)
        before = CpuSample.take(pids or {}, trees)
        await asyncio.sleep(seconds)
        load.cpu = spent(before, CpuSample.take(pids or {}, trees))

    tasks = [asyncio.create_task(run(index, client)) for index, client in enumerate(clients)]
    await asyncio.sleep(0.5)  # every session made
    begin = time.perf_counter()
    ready.set()
    await asyncio.gather(sample_cpu(), *tasks)
    return load
