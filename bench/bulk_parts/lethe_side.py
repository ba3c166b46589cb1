"""Lethe's side: a subjects file submitted with `lethe.sdk.bulk.submit`, followed through its
history to the window timer, with the worker's peak memory sampled meanwhile and the bulk
request's counts checked afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import psutil
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.workflowservice.v1 import DeleteWorkflowExecutionRequest
from temporalio.client import Client as TemporalClient

from bench import BenchError
from bench.bulk_parts.chain import Chain, follow_chain, run_ids
from bench.erasure_parts.sample_data import TENANT, email_of
from lethe.contracts import BulkProgress
from lethe.sdk import bulk
from lethe.sdk.client import Client

RSS_EVERY = 0.2
"""Seconds between samples of the worker's resident memory."""


@dataclass(frozen=True)
class LetheRun:
    """What Lethe's side measured."""

    bulk_id: str
    called_at: float
    submitted_at: float
    """Wall clock when `submit` returned (the subjects checked, staged, the workflow started)."""
    chain: Chain
    progress: BulkProgress

    @property
    def seconds(self) -> float:
        """From the submit call to the window timer."""
        return self.chain.timer_at - self.called_at


def write_subjects_file(path: Path, subjects: list[str]) -> Path:
    """A subjects file (CSV: subject_id, email) as a DPO gives it."""
    with path.open("w") as out:
        out.write("subject_id,email\n")
        out.writelines(f"{s},{email_of(s)}\n" for s in subjects)
    return path


class PeakRss:
    """The highest resident memory of a process, sampled while `sampling` is entered."""

    def __init__(self, pid: int) -> None:
        """Sample process `pid`."""
        self.process = psutil.Process(pid)
        self.peak = 0

    def sample(self) -> None:
        """Take one sample."""
        with contextlib.suppress(psutil.NoSuchProcess):
            self.peak = max(self.peak, self.process.memory_info().rss)

    @contextlib.asynccontextmanager
    async def sampling(self) -> AsyncIterator[PeakRss]:
        """Sample every RSS_EVERY seconds until the block ends."""

        async def loop() -> None:
            while True:
                self.sample()
                await asyncio.sleep(RSS_EVERY)

        task = asyncio.create_task(loop())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.sample()


def check_progress(progress: BulkProgress, total: int) -> None:
    """Every subject settled in the immediate phase, none failed; else the run is invalid."""
    counts = progress.counts
    if progress.state != "waiting_window" or counts.failed or counts.settled != total:
        raise BenchError(
            f"bulk request is {progress.state}: {counts.settled} of {total} settled, "
            f"{counts.failed} failed, failures {progress.failures}"
        )


async def run_lethe(
    client: Client, subjects_file: Path, total: int, batch_size: int, timeout: float
) -> LetheRun:
    """Submit the file and follow the request to its window timer."""
    called = time.time()
    bulk_id = await bulk.submit(
        client,
        tenant=TENANT,
        subjects=subjects_file,
        requested_by="bench",
        reason="benchmark",
        batch_size=batch_size,
    )
    submitted = time.time()
    chain = await follow_chain(client.temporal, bulk_id, timeout)
    progress = await bulk.progress(client, bulk_id)
    check_progress(progress, total)
    return LetheRun(bulk_id, called, submitted, chain, progress)


async def delete_chain(temporal: TemporalClient, workflow_id: str, *, keep: bool) -> None:
    """Terminate the request; unless `keep`, delete every run of its chain."""
    with contextlib.suppress(Exception):
        await temporal.get_workflow_handle(workflow_id).terminate("benchmark over")
    if keep:
        return
    for run_id in await run_ids(temporal, workflow_id):
        with contextlib.suppress(Exception):
            await temporal.workflow_service.delete_workflow_execution(
                DeleteWorkflowExecutionRequest(
                    namespace=temporal.namespace,
                    workflow_execution=WorkflowExecution(workflow_id=workflow_id, run_id=run_id),
                )
            )
