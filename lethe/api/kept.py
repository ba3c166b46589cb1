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
    """Answers by key, each kept `seconds`; concurrent callers of one key share one call.

    With `refreshed_until`, an answer older than `seconds` but younger than that is still given
    at once while one call in the background fetches the next (readers never wait on a busy
    key); only past `refreshed_until` do they wait for a fresh one.
    """

    def __init__(self, seconds: float, refreshed_until: float | None = None) -> None:
        self.seconds = seconds
        self.refreshed_until = refreshed_until
        self._answers: dict[Hashable, tuple[float, asyncio.Future[V]]] = {}
        self._refreshing: dict[Hashable, asyncio.Future[V]] = {}

    async def get(self, key: Hashable, call: Callable[[], Awaitable[V]]) -> V:
        """The kept answer for `key`, or `call()`'s (shared with whoever asks meanwhile)."""
        now = time.monotonic()
        found = self._answers.get(key)
        if found is not None and self._refreshable(found, now):
            if key not in self._refreshing:
                self._refresh(key, call)
            return found[1].result()
        if found is None or now - found[0] > self.seconds or _failed(found[1]):
            if len(self._answers) >= MAX_KEPT:
                self._drop_stale(now)
            found = (now, asyncio.ensure_future(call()))
            self._answers[key] = found
        return await asyncio.shield(found[1])

    def _refreshable(self, found: tuple[float, asyncio.Future[V]], now: float) -> bool:
        """An answer to give at once while a fresher one is fetched."""
        at, answer = found
        return (
            self.refreshed_until is not None
            and self.seconds < now - at <= self.refreshed_until
            and answer.done()
            and not _failed(answer)
        )

    def _refresh(self, key: Hashable, call: Callable[[], Awaitable[V]]) -> None:
        fresh = asyncio.ensure_future(call())
        self._refreshing[key] = fresh

        def done(future: asyncio.Future[V]) -> None:
            self._refreshing.pop(key, None)
            if not _failed(future) and key in self._answers:
                self._answers[key] = (time.monotonic(), future)

        fresh.add_done_callback(done)

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
