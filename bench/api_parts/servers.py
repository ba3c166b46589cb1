"""The servers the benchmark measures, each a process of its own: `lethe serve` as an operator
runs it, and the bare application with the same uvicorn settings. Neither shares the load
generator's event loop; each counts as started once it answers its health path."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp

from bench.api_parts import bare
from bench.harness.stack import ROOT

LOG_TAIL = 3000


class ServerDidNotStart(Exception):
    """The server exited, or did not answer in time; the message ends with its log."""


def free_port() -> int:
    """A TCP port nothing listens on now (on 127.0.0.1)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class ServerProcess:
    """A web server process on 127.0.0.1:<free port>, its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path, ready: str):
        """`argv` gets `--bind 127.0.0.1:<port>`; it is up once GET `ready` answers 200."""
        self.name = name
        self.port = free_port()
        self.argv = [*argv, "--bind", f"127.0.0.1:{self.port}"]
        self.env = env
        self.log = log
        self.ready = ready
        self.process: asyncio.subprocess.Process | None = None

    @classmethod
    def lethe(cls, env: dict[str, str], log: Path, profile: Path | None = None) -> ServerProcess:
        """`lethe serve`, with the settings in `env`; under cProfile, written to `profile` when
        it stops, if given; with a what-if of `bench.api_parts.served` if `env` asks for one."""
        command = [str(Path(sys.executable).parent / "lethe"), "serve"]
        if profile is not None:
            command = [sys.executable, "-m", "bench.api_parts.served", "serve"]
        if profile is not None:
            command = [sys.executable, "-m", "cProfile", "-o", str(profile), *command[1:]]
        return cls("lethe serve", command, env, log, "/v1/health")

    @classmethod
    def bare(cls, env: dict[str, str], log: Path) -> ServerProcess:
        """The bare application."""
        command = [sys.executable, "-m", "bench.api_parts.bare"]
        return cls("bare FastAPI", command, env, log, bare.PATH)

    @property
    def base(self) -> str:
        """The server's address."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The server's process id."""
        if self.process is None:
            raise ServerDidNotStart(f"{self.name} was not started")
        return self.process.pid

    async def start(self, timeout: float = 60) -> None:
        """Start it and wait until it answers; ServerDidNotStart if it exits or is late."""
        with self.log.open("ab") as sink:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, cwd=ROOT, env=self.env, stdout=sink, stderr=sink
            )
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession(self.base) as session:
            while time.monotonic() < deadline and self.process.returncode is None:
                try:
                    async with session.get(self.ready) as answer:
                        if answer.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        await self.stop()
        tail = self.log.read_text(errors="replace")[-LOG_TAIL:]
        raise ServerDidNotStart(f"{self.name} did not answer; its log ends:\n{tail}")

    async def stop(self, timeout: float = 15) -> None:
        """SIGTERM; SIGKILL if it has not stopped after `timeout` seconds."""
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()
