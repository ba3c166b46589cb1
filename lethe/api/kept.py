"""Answers kept for a moment: many readers of the same thing at once share one call.

Fifty dashboards following one request ask Temporal once a second, not fifty times; a token
presented on every request is looked up once every few seconds, not on each. A failure is
never kept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")
MAX_KEPT = 10_000


class Kept(Generic[V]):
    """Answers by key, each kept `seconds`; concurrent callers of one key share one call."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._answers: dict[Hashable, tuple[float, asyncio.Future[V]]] = {}

    async def get(self, key: Hashable, call: Callable[[], Awaitable[V]]) -> V:
        """The kept answer for `key`, or `call()`'s (shared with whoever asks meanwhile)."""
        now = time.monotonic()
        found = self._answers.get(key)
        if found is None or now - found[0] > self.seconds or _failed(found[1]):
            if len(self._answers) >= MAX_KEPT:
                self._drop_stale(now)
            found = (now, asyncio.ensure_future(call()))
            self._answers[key] = found
        return await asyncio.shield(found[1])

    def forget(self, key: Hashable | None = None) -> None:
        """Drop the kept answer of `key`, or every one (after a change that makes them wrong)."""
        if key is None:
            self._answers.clear()
        else:
            self._answers.pop(key, None)

    def _drop_stale(self, now: float) -> None:
        for key, (at, _) in list(self._answers.items()):
            if now - at > self.seconds:
                del self._answers[key]
        if len(self._answers) >= MAX_KEPT:
            self._answers.clear()


def _failed(future: asyncio.Future[V]) -> bool:
    return future.done() and (future.cancelled() or future.exception() is not None)
