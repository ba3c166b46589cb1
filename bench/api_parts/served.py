"""`lethe serve` as the benchmark runs it when it profiles it or tries a change of the audit
query: `python [-m cProfile -o F] -m bench.api_parts.served serve --bind H:P`.

uvicorn raises the signal that stopped it again once it has shut down; with the default handler
SIGTERM would end the process before cProfile writes its output, so here it exits normally.

With BENCH_LEDGER_BY_TIME=1, `lethe.evidence.ledger.search` is replaced by `search_by_time`: the
same filters, newest first by (at, seq) instead of by seq alone, so PostgreSQL reads a tenant's
entries of an action in a period from the (tenant, action, at) index instead of walking the
primary key backwards; the next page is the one before (at, seq) of `before_seq`. It is the
change the audit query needs, measured before it is made in `ledger.search`.

With BENCH_STATUS_KEPT=1, two answers are kept for a moment, as the status read could keep them:
a checked token's principal for TOKEN_KEPT_SECONDS (keyed by the SHA-256 of the presented
secret; a revocation then takes effect within that time), and a request's status for
STATUS_KEPT_SECONDS, one Temporal query at a time per request (concurrent readers of one
request share it). Also measured before any such change is made.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from datetime import datetime
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncEngine

from lethe.cli.app import app
from lethe.contracts import LedgerEntry
from lethe.evidence import ledger, tokens
from lethe.evidence.store import ledger as table
from lethe.sdk.client import Client

BY_TIME = "BENCH_LEDGER_BY_TIME"
STATUS_KEPT = "BENCH_STATUS_KEPT"
TOKEN_KEPT_SECONDS = 5.0
STATUS_KEPT_SECONDS = 1.0
P = ParamSpec("P")
V = TypeVar("V")


def kept(
    seconds: float, call: Callable[P, Awaitable[V]], key: Callable[P, Hashable]
) -> Callable[P, Coroutine[Any, Any, V]]:
    """`call`, its answer kept `seconds` by `key` of its arguments (a failure is not kept);
    callers of one key at once share one call."""
    answers: dict[Hashable, tuple[float, asyncio.Future[V]]] = {}

    async def keeping(*args: P.args, **kwargs: P.kwargs) -> V:
        now, which = time.monotonic(), key(*args, **kwargs)
        found = answers.get(which)
        failed = found is not None and found[1].done() and found[1].exception() is not None
        if found is None or failed or now - found[0] > seconds:
            found = answers[which] = (now, asyncio.ensure_future(call(*args, **kwargs)))
        return await asyncio.shield(found[1])

    return keeping


def keep_status_answers() -> None:
    """Keep checked tokens and requests' statuses for a moment (BENCH_STATUS_KEPT)."""

    def token_key(engine: AsyncEngine, presented: str) -> Hashable:
        return hashlib.sha256(presented.encode()).hexdigest()

    def status_key(self: Client, workflow_id: str) -> Hashable:
        return (id(self), workflow_id)

    tokens.authenticate = kept(TOKEN_KEPT_SECONDS, tokens.authenticate, token_key)
    Client.status = kept(STATUS_KEPT_SECONDS, Client.status, status_key)  # type: ignore[method-assign]


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
    if os.environ.get(STATUS_KEPT) == "1":
        keep_status_answers()
    app(prog_name="lethe")
