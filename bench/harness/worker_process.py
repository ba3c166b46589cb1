"""A worker as an operator runs it: `python worker.py --region R --control`, as a process.

Tests crash, restart and stop workers this way, and benchmarks measure them, so the worker is
never in the same process (or event loop) as the code that drives it. Its output goes to a log
file; it counts as started once the log says `polling <queue>` for each of its queues.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

from bench.harness.stack import ROOT
from lethe.kernel.regions import task_queue

LOG_TAIL = 3000
"""How much of the log a failure to start shows."""


class WorkerDidNotStart(Exception):
    """The worker exited, or did not poll its queues in time; the message ends with its log."""


class WorkerProcess:
    """`python worker.py --region R --control` with environment `env`, its log in a file."""

    script = "worker.py"
    """What `start` runs, relative to the repository (a test may run a wrapper of worker.py)."""

    def __init__(self, region: str, env: dict[str, str], log: Path) -> None:
        """Describe the worker; `start` runs it. `env` names the control queue."""
        self.region = region
        self.env = env
        self.log = log
        self.process: asyncio.subprocess.Process | None = None

    def arguments(self) -> list[str]:
        """The script's arguments."""
        return ["--region", self.region, "--control"]

    def queues(self) -> list[str]:
        """The task queues the worker polls once started: its region's and the control queue."""
        control = self.env["LETHE_CONTROL_QUEUE"]
        return [task_queue(self.region, control), control]

    @property
    def pid(self) -> int:
        """The running worker's process id."""
        if self.process is None:
            raise WorkerDidNotStart(f"{self.script} was not started")
        return self.process.pid

    async def start(self, timeout: float = 30) -> None:
        """Start the worker and wait until it polls every queue; WorkerDidNotStart if it exits
        first or `timeout` seconds pass (it is stopped then). A restart appends to the log."""
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as sink:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                self.script,
                *self.arguments(),
                cwd=ROOT,
                env=self.env,
                stdout=sink,
                stderr=sink,
            )
        wanted = [f"polling {queue}" for queue in self.queues()]
        deadline = time.monotonic() + timeout
        while True:
            written = (await asyncio.to_thread(self.log.read_bytes))[offset:].decode(
                errors="replace"
            )
            if all(line in written for line in wanted):
                return
            if self.process.returncode is not None or time.monotonic() > deadline:
                how = "exited" if self.process.returncode is not None else "did not poll in time"
                await self.stop()
                raise WorkerDidNotStart(
                    f"{self.script} {how}; its log ends:\n{written[-LOG_TAIL:]}"
                )
            await asyncio.sleep(0.1)

    async def kill(self) -> None:
        """SIGKILL: no shutdown, no finishing of running tasks (a crash)."""
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def stop(self, timeout: float = 15) -> None:
        """SIGTERM, as an operator stops it; SIGKILL if it has not stopped after `timeout` s."""
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            await self.kill()

    def log_text(self) -> str:
        """Everything the worker logged."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""
