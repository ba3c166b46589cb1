"""Lethe's worker: `python worker.py --region eu` polls `lethe-eu`; `--control` adds control.

A region's worker runs the connectors for that region's systems. The control worker runs the
erasure workflow itself, planning, legal-hold checks, the ledger and certificates: it needs
Lethe's store, the data map and the policy pack, and no data-system credentials.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, NoReturn

from temporalio.client import Client as TemporalClient
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.worker import Worker

from lethe.activities import bulk, retention
from lethe.activities import ledger as control
from lethe.activities.clients import Clients
from lethe.activities.connectors import Connectors
from lethe.activities.healthcheck import report_worker
from lethe.activities.key_rotation import KeyRotations
from lethe.activities.planning import plan_erasure
from lethe.evidence import store
from lethe.kernel.config import Settings, load_settings
from lethe.kernel.database import dispose_all
from lethe.kernel.errors import LetheError
from lethe.kernel.regions import task_queue, validate_region
from lethe.keys import store as key_store
from lethe.temporal.connection import connect
from lethe.workflows.bulk_erasure import BulkErasureWorkflow
from lethe.workflows.erasure import ErasureWorkflow
from lethe.workflows.healthcheck import HealthCheckWorkflow
from lethe.workflows.key_rotation import KeyRotationWorkflow
from lethe.workflows.regional_erasure import RegionalErasureWorkflow
from lethe.workflows.retention import RetentionSweepWorkflow

WORKFLOWS: Sequence[type] = (HealthCheckWorkflow, RegionalErasureWorkflow)
CONTROL_WORKFLOWS: Sequence[type] = (
    ErasureWorkflow,
    BulkErasureWorkflow,
    KeyRotationWorkflow,
    RetentionSweepWorkflow,
)
CONTROL_ACTIVITIES: Sequence[Callable[..., Any]] = (
    plan_erasure,
    control.record,
    control.blocking,
    control.issue,
    control.remember,
    control.listed,
    retention.plan,
    retention.next_batch,
    retention.keep_report,
    bulk.plan_bulk,
    bulk.stage_found,
    bulk.next_batch,
    bulk.record_batch,
    bulk.next_recheck,
    bulk.record_recheck,
    bulk.finish,
)

log = logging.getLogger("lethe.worker")


def build_worker(
    client: TemporalClient, region: str, settings: Settings, connectors: Connectors
) -> Worker:
    """A worker for one region's task queue: the regional workflow and every connector, over
    `connectors` (the caller opens and closes them)."""
    return Worker(
        client,
        task_queue=task_queue(region, settings.control_queue),
        workflows=list(WORKFLOWS),
        activities=[report_worker, *connectors.activities()],
        graceful_shutdown_timeout=timedelta(seconds=settings.worker_shutdown_grace_seconds),
    )


def build_control_worker(client: TemporalClient, settings: Settings) -> Worker:
    """The control plane's worker: erasure, key rotation, retention sweeps, planning, holds,
    ledger, certificates."""
    return Worker(
        client,
        task_queue=settings.control_queue,
        workflows=list(CONTROL_WORKFLOWS),
        activities=[*CONTROL_ACTIVITIES, *KeyRotations().activities()],
        graceful_shutdown_timeout=timedelta(seconds=settings.worker_shutdown_grace_seconds),
    )


def _runtime(settings: Settings) -> Runtime | None:
    if settings.metrics_bind is None:
        return None
    return Runtime(
        telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=settings.metrics_bind))
    )


async def check_stores(settings: Settings, *, control: bool) -> None:
    """Bring the stores this worker uses to their schemas' heads before it polls: the key store
    (the payload codec's keys), and Lethe's store for the control plane. With
    LETHE_DB_MIGRATE=refuse a store that is behind stops the worker here, naming the command."""
    await key_store.key_engine(settings.key_store_url)
    if control:
        await store.engine_for(settings.store_url.get_secret_value())


async def serve(
    region: str, settings: Settings, *, control: bool = False, stop: asyncio.Event | None = None
) -> None:
    """Poll the region's task queue (and the control queue) until SIGTERM, SIGINT or `stop`."""
    validate_region(region)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await check_stores(settings, control=control)
    client = await connect(settings, runtime=_runtime(settings))
    async with contextlib.AsyncExitStack() as running:
        clients = await running.enter_async_context(Clients())
        workers = [build_worker(client, region, settings, Connectors(clients))]
        if control:
            workers.append(build_control_worker(client, settings))
        for worker in workers:
            await running.enter_async_context(worker)
            log.info("worker polling %s", worker.task_queue)
        if settings.metrics_bind:
            log.info("Prometheus metrics on http://%s/metrics", settings.metrics_bind)
        # What the worker made to start (modules, clients) lives as long as it does: kept out
        # of the collector's full passes, which then cost a bulk batch ~45 ms less.
        gc.freeze()
        await stop.wait()
        log.info(
            "shutting down: finishing running tasks (up to %ss)",
            settings.worker_shutdown_grace_seconds,
        )
    await dispose_all()
    log.info("worker stopped")


def run(region: str, *, control: bool = False) -> NoReturn:
    """Serve one region (and the control plane) until a signal arrives, then end the process.

    The process ends with os._exit once the workers have shut down cleanly: the Temporal SDK's
    runtime can crash at interpreter exit (sdk-python issue 300; seen here as SIGSEGV after
    "worker stopped"), which would turn a clean stop into a failed exit code.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # The Azure SDK logs every HTTP request at INFO (hundreds of lines an erasure, blob names
    # included): its warnings and errors are what an operator needs.
    logging.getLogger("azure").setLevel(logging.WARNING)
    asyncio.run(serve(region, load_settings(), control=control))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python worker.py --region R`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--region", required=True, help="the region to serve, e.g. eu")
    parser.add_argument(
        "--control", action="store_true", help="also serve the control queue (lethe-control)"
    )
    args = parser.parse_args(argv)
    try:
        run(args.region, control=args.control)
    except LetheError as exc:
        print(f"lethe worker: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
