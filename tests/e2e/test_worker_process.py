"""The worker as an operator runs it: a process per region, pinged, scraped, and stopped cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import urllib.request
from pathlib import Path

from temporalio.client import Client as TemporalClient

from tests.e2e.conftest import run_lethe

ROOT = Path(__file__).resolve().parents[2]
METRICS = "127.0.0.1:59464"


async def _worker(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    """Run `python worker.py ARGS` to its end; its exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "worker.py",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def _wait_for_line(stream: asyncio.StreamReader, text: str, timeout: float = 30) -> str:
    seen: list[str] = []
    async with asyncio.timeout(timeout):
        while True:
            line = (await stream.readline()).decode()
            assert line, f"stream closed before {text!r}; saw: {''.join(seen)}"
            seen.append(line)
            if text in line:
                return "".join(seen)


async def test_worker_serves_its_region_exposes_metrics_and_stops_on_sigterm(
    stack_temporal: TemporalClient,
) -> None:
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "worker.py",
        "--region",
        "e2e",
        cwd=ROOT,
        env={**os.environ, "LETHE_METRICS_BIND": METRICS},
        stderr=asyncio.subprocess.PIPE,
    )
    assert worker.stderr is not None
    try:
        await _wait_for_line(worker.stderr, "polling lethe-e2e")

        ping = await run_lethe(os.environ, "ping", "--region", "e2e", "--timeout", "30")
        assert ping.code == 0, str(ping)
        assert "lethe-e2e" in ping.stdout

        metrics = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=10).read().decode()
        )
        assert "temporal_workflow_completed" in metrics or "workflow_completed" in metrics

        worker.send_signal(signal.SIGTERM)
        log = await _wait_for_line(worker.stderr, "worker stopped")
        assert "shutting down" in log
        assert await asyncio.wait_for(worker.wait(), 30) == 0
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()


async def test_ping_without_a_worker_says_how_to_start_one(stack_temporal: TemporalClient) -> None:
    ping = await run_lethe(os.environ, "ping", "--region", "nobody-home", "--timeout", "2")
    assert ping.code == 1, str(ping)
    assert "no worker answered on lethe-nobody-home" in ping.stderr
    assert "lethe worker --region nobody-home" in ping.stderr


async def test_a_malformed_region_is_refused_before_anything_starts() -> None:
    code, _, stderr = await _worker("--region", "EU; DROP TABLE")
    assert code == 2
    assert "not a valid region name" in stderr
