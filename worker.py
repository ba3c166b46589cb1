"""Lethe's worker: `python worker.py --region eu` polls the task queue `lethe-eu`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from temporalio.client import Client as TemporalClient
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.worker import Worker

from activities.healthcheck import report_worker
from lethe.client import connect
from lethe.config import Settings, load_settings
from lethe.errors import LetheError
from lethe.regions import task_queue, validate_region
from workflows.healthcheck import HealthCheckWorkflow

WORKFLOWS: Sequence[type] = (HealthCheckWorkflow,)
ACTIVITIES: Sequence[Callable[..., Any]] = (report_worker,)

log = logging.getLogger("lethe.worker")


def build_worker(client: TemporalClient, region: str, settings: Settings) -> Worker:
    """A worker for one region's task queue with every Lethe workflow and activity."""
    return Worker(
        client,
        task_queue=task_queue(region),
        workflows=list(WORKFLOWS),
        activities=list(ACTIVITIES),
        graceful_shutdown_timeout=timedelta(seconds=settings.worker_shutdown_grace_seconds),
    )


def _runtime(settings: Settings) -> Runtime | None:
    if settings.metrics_bind is None:
        return None
    return Runtime(
        telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=settings.metrics_bind))
    )


async def serve(region: str, settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Poll the region's task queue until SIGTERM, SIGINT or `stop`, then finish running tasks."""
    validate_region(region)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    client = await connect(settings, runtime=_runtime(settings))
    async with build_worker(client, region, settings):
        log.info("worker for region %s polling %s", region, task_queue(region))
        if settings.metrics_bind:
            log.info("Prometheus metrics on http://%s/metrics", settings.metrics_bind)
        await stop.wait()
        log.info(
            "shutting down: finishing running tasks (up to %ss)",
            settings.worker_shutdown_grace_seconds,
        )
    log.info("worker stopped")


def run(region: str) -> None:
    """Load the settings and serve one region until a signal arrives."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve(region, load_settings()))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python worker.py --region R`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--region", required=True, help="the region to serve, e.g. eu")
    args = parser.parse_args(argv)
    try:
        run(args.region)
    except LetheError as exc:
        print(f"lethe worker: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
