"""Lethe's side: `RetentionSweepWorkflow` started with the SDK's `start_sweep` and followed with
`follow` to its report, with a control worker and the region's worker in this process.

The run's data map (written from `datamap.yaml`) maps the table; `policy.yaml` holds the one
limit. The plan is checked before anything runs: one SQL task, deleting after 90 days.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from string import Template

from temporalio.client import Client as TemporalClient

from bench import BenchError
from bench.retention_parts.measure import Cost, measured
from bench.retention_parts.sessions import LIMIT, TABLE
from lethe.activities.clients import Clients
from lethe.activities.connectors import Connectors
from lethe.contracts import SweepReport, SweepRequest
from lethe.kernel.config import Settings
from lethe.plans.planner import Planner
from lethe.plans.retention import plan_sweep
from lethe.sdk.retention import follow, start_sweep
from lethe.worker import build_control_worker, build_worker, check_stores

HERE = Path(__file__).resolve().parent
POLICY = HERE / "policy.yaml"
REGION = "eu"
CONNECTION = "LETHE_BENCH_RETENTION_URL"
"""The variable holding the URL of the run's database, which the data map names."""


def write_datamap(folder: Path) -> Path:
    """The run's data map, written into `folder`; its path."""
    text = Template((HERE / "datamap.yaml").read_text()).substitute(
        connection=CONNECTION, table=TABLE
    )
    path = folder / "datamap.yaml"
    path.write_text(text)
    return path


def check_plan(datamap: Path) -> None:
    """BenchError unless the sweep plans exactly one SQL task that deletes after 90 days."""
    planner = Planner.from_files(datamap, POLICY)
    tasks = plan_sweep(planner.datamap, planner.pack).tasks
    if (
        len(tasks) != 1
        or tasks[0].kind != "sql"
        or tasks[0].kept
        or tasks[0].limit is None
        or tasks[0].limit.period != LIMIT
        or tasks[0].limit.action != "delete"
    ):
        raise BenchError(f"unexpected sweep plan: {[task.model_dump() for task in tasks]}")


@dataclass(frozen=True)
class Swept:
    """Lethe's side: its report, its workflow id, and what it cost."""

    report: SweepReport
    run_id: str
    cost: Cost


async def lethe_sweep(
    temporal: TemporalClient,
    settings: Settings,
    batch_size: int,
    started: list[str],
    timeout: float,
) -> Swept:
    """Run one sweep to its report with this process's workers, timed from the start call to
    the report (planning, every batch and its ledger entry, the report kept); its workflow id
    is added to `started` as soon as it runs. BenchError when it has no report after `timeout`
    seconds (a workflow task failing again and again never ends the workflow)."""
    await check_stores(settings, control=True)
    request = SweepRequest(requested_by="bench-retention", batch_size=batch_size)
    async with contextlib.AsyncExitStack() as running:
        clients = await running.enter_async_context(Clients())
        for worker in (
            build_worker(temporal, REGION, settings, Connectors(clients)),
            build_control_worker(temporal, settings),
        ):
            await running.enter_async_context(worker)
        async with measured() as meter:
            run_id = await start_sweep(temporal, settings, request)
            started.append(run_id)
            try:
                async with asyncio.timeout(timeout):
                    report = await follow(temporal, run_id)
            except TimeoutError:
                raise BenchError(
                    f"sweep {run_id} gave no report within {timeout:.0f} s (see the worker's "
                    "messages above)"
                ) from None
    assert meter.cost is not None
    return Swept(report=report, run_id=run_id, cost=meter.cost)
