"""`lethe serve` as the benchmark runs it when it profiles it or tries a change of the audit
query: `python [-m cProfile -o F] -m bench.api_parts.served serve --bind H:P`.

uvicorn raises the signal that stopped it again once it has shut down; with the default handler
SIGTERM would end the process before cProfile writes its output, so here it exits normally.

With BENCH_LEDGER_BY_TIME=1, `lethe.evidence.ledger.search` is replaced by `search_by_time`: the
same filters, newest first by (at, seq) instead of by seq alone, so PostgreSQL reads a tenant's
entries of an action in a period from the (tenant, action, at) index instead of walking the
primary key backwards; the next page is the one before (at, seq) of `before_seq`. It is the
change the audit query needs, measured before it is made in `ledger.search`.

With BENCH_STATUS_REFRESHED=1, the API's kept statuses (`lethe.api.kept.Kept`, only the one
`lethe.api.app` makes for statuses) are refreshed in the background: once an answer is older
than its time, the next reader gets it at once while one query fetches the next; a reader waits
only for the first answer, after a failure, after `forget`, or when the kept one is older than
REFRESHED_AT_MOST_SECONDS. Measured before any such change is made.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Hashable
from datetime import datetime
from typing import TypeVar

from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncEngine

from lethe.api import app as api_app
from lethe.api.kept import Kept, _failed
from lethe.cli.app import app
from lethe.contracts import LedgerEntry
from lethe.evidence import ledger
from lethe.evidence.store import ledger as table

BY_TIME = "BENCH_LEDGER_BY_TIME"
REFRESHED = "BENCH_STATUS_REFRESHED"
REFRESHED_AT_MOST_SECONDS = 5.0
V = TypeVar("V")


class Refreshed(Kept[V]):
    """Kept answers, refreshed in the background once older than `seconds`."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self._refreshing: dict[Hashable, asyncio.Future[V]] = {}

    async def get(self, key: Hashable, call: Callable[[], Awaitable[V]]) -> V:
        """The kept answer at once (a refresh started if it is old), or the first one."""
        found = self._answers.get(key)
        now = time.monotonic()
        if found is None or not found[1].done() or _failed(found[1]):
            return await super().get(key, call)
        age = now - found[0]
        if age > REFRESHED_AT_MOST_SECONDS:
            self.forget(key)
            return await super().get(key, call)
        if age > self.seconds and key not in self._refreshing:
            self._refresh(key, call)
        return found[1].result()

    def _refresh(self, key: Hashable, call: Callable[[], Awaitable[V]]) -> None:
        fresh = asyncio.ensure_future(call())
        self._refreshing[key] = fresh

        def done(future: asyncio.Future[V]) -> None:
            self._refreshing.pop(key, None)
            if not _failed(future):
                self._answers[key] = (time.monotonic(), future)

        fresh.add_done_callback(done)


async def search_by_time(
    engine: AsyncEngine,
    *,
    tenant: str | None = None,
    request_id: str | None = None,
    action: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    before_seq: int | None = None,
    limit: int = 50,
) -> list[LedgerEntry]:
    """`ledger.search`, newest first by (at, seq)."""
    query = select(table).order_by(table.c.at.desc(), table.c.seq.desc()).limit(limit)
    query = ledger._in_scope(query)
    for column, value in (
        (table.c.tenant, tenant),
        (table.c.request_id, request_id),
        (table.c.action, action),
    ):
        if value is not None:
            query = query.where(column == value)
    if since is not None:
        query = query.where(table.c.at >= since)
    if until is not None:
        query = query.where(table.c.at < until)
    if before_seq is not None:
        at_of = select(table.c.at).where(table.c.seq == before_seq).scalar_subquery()
        query = query.where(tuple_(table.c.at, table.c.seq) < tuple_(at_of, before_seq))
    async with engine.connect() as conn:
        return [ledger._entry(row) for row in await conn.execute(query)]


def _exit(*_: object) -> None:
    sys.exit(0)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit)
    if os.environ.get(BY_TIME) == "1":
        ledger.search = search_by_time
    if os.environ.get(REFRESHED) == "1":
        api_app.Kept = Refreshed  # type: ignore[attr-defined]
    app(prog_name="lethe")
