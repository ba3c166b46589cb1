"""The codec's cost: workflow throughput and CPU with and without Lethe's payload codec, in
pairs of bursts on a Temporal dev server of the run's own."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import statistics
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta

from pydantic import BaseModel
from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload
from temporalio.client import Client as TemporalClient
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import PayloadCodec
from temporalio.worker import Worker

from bench import BenchError
from bench.harness.cpu import process_tree_seconds
from bench.harness.stats import mean_interval
from lethe.codec.converter import codec_from_settings, data_converter
from lethe.kernel.config import load_settings
from lethe.temporal.embedded import start_dev_server

WARMUP_WORKFLOWS = 20


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
    begun, cpu_begun = time.perf_counter(), process_tree_seconds()
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
    cpu_ms = (process_tree_seconds() - cpu_begun) * 1000 / count
    if any(result != request for result in results):
        raise BenchError("a workflow returned something other than its input")
    return rate, cpu_ms


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
