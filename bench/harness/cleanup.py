"""Undoing what a run made: an exit stack whose every step runs and says when it fails, and a
way to let Ctrl-C (or SIGTERM) unwind it instead of killing the run where it stands."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class Cleanup(contextlib.AsyncExitStack):
    """An `AsyncExitStack` for what a run creates, undone newest first when the block ends, also
    after an error or a cancellation (Ctrl-C). A step that fails is reported through `report`
    and the others still run, so one stuck resource does not leave the rest behind."""

    def __init__(self, report: Callable[[str], None]) -> None:
        """Report failed steps through `report` (one line each)."""
        super().__init__()
        self.report = report

    def undo(self, what: str, action: Callable[[], Awaitable[None]]) -> None:
        """Remember how to remove `what`: `action` runs when the stack unwinds."""

        async def reported() -> None:
            try:
                await action()
            except Exception as exc:
                self.report(f"cleanup: could not remove {what}: {exc!r}")

        self.push_async_callback(reported)

    async def enter(self, what: str, manager: AbstractAsyncContextManager[T]) -> T:
        """Enter `manager` (which makes `what`); it is left, reported like `undo`, on unwinding."""
        value = await manager.__aenter__()
        self.undo(what, lambda: _leave(manager))
        return value


async def _leave(manager: AbstractAsyncContextManager[object]) -> None:
    await manager.__aexit__(None, None, None)


async def remove_tree(path: Path) -> None:
    """Remove a folder and everything in it."""
    await asyncio.to_thread(shutil.rmtree, path)


async def stoppable(work: Awaitable[T]) -> T:
    """Await `work`; SIGINT or SIGTERM cancels it once, so its clean-up still runs."""
    task = asyncio.ensure_future(work)

    def stop() -> None:
        if not task.cancelling():
            task.cancel()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    return await task
