"""Preflight checks of blob containers that passed, kept for a short time per worker.

Each request's preflight checks every step of its plan, the deferred blob and logs steps
included: the container exists, the credentials open it, listing (and finding by tag) there is
allowed, a log blob's records carry the tenant field. Through the Azure SDK's async pipeline each
of those calls costs the worker ~1.5 ms of CPU, and the answer is the same for every subject of
the same locator. A check that passed is kept for `TTL_SECONDS` (as `sql_schema.SchemaCache`
keeps table descriptions), for the connection string and the check's key; a problem is never
kept: the next preflight asks the service again, so every problem reported was found afresh.
Checks of the same key that run at the same time share one call to the service (the answer,
problem or error, goes to every caller waiting for it then, and no further). An erase or verify
that finds the container gone drops what is kept of it (`forget`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field

TTL_SECONDS = 30.0
"""How long a check that passed is reused."""

Key = tuple[Hashable, ...]
"""What makes two checks the same; its second item is the container's name."""
Check = Callable[[], Awaitable[list[str] | None]]
"""A check asked of the service: its problems, or None when it found none but could not look."""


@dataclass
class ContainerChecks:
    """The checks of one storage account's containers that passed, each reused for TTL_SECONDS."""

    ttl_seconds: float = TTL_SECONDS
    reads: int = 0
    """How many checks asked the service (for tests and benchmarks)."""
    _passed: dict[Key, float] = field(default_factory=dict)
    _running: dict[Key, asyncio.Task[list[str] | None]] = field(default_factory=dict)

    def kept(self, key: Key) -> bool:
        """Whether the check `key` passed less than the TTL ago."""
        passed = self._passed.get(key)
        if passed is None:
            return False
        if time.monotonic() - passed < self.ttl_seconds:
            return True
        del self._passed[key]
        return False

    async def problems(self, key: Key, check: Check) -> list[str]:
        """The problems `check` finds: none when it passed under `key` less than the TTL ago;
        else the answer of the check of `key` already running, or of `check` run now. A check
        that finds no problem is kept (one that answers None, for none found but nothing
        checked, is not)."""
        if self.kept(key):
            return []
        running = self._running.get(key)
        if running is None:
            running = self._running[key] = asyncio.create_task(self._run(key, check))
            running.add_done_callback(_retrieved)
        found = await asyncio.shield(running)
        return list(found or [])

    def forget(self, container: str) -> None:
        """Drop every kept check of `container`: the next preflight asks the service."""
        for key in [k for k in self._passed if k[1] == container]:
            del self._passed[key]

    async def _run(self, key: Key, check: Check) -> list[str] | None:
        self.reads += 1
        try:
            found = await check()
        finally:
            del self._running[key]
        if found == []:
            self._passed[key] = time.monotonic()
        return found


def _retrieved(task: asyncio.Task[list[str] | None]) -> None:
    """Take a check's error even when every caller waiting for it was cancelled."""
    if not task.cancelled():
        task.exception()
