"""`lethe serve` as the benchmark runs it when it profiles it or tries a change of the audit
query: `python [-m cProfile -o F] -m bench.api_parts.served serve --bind H:P`.

uvicorn raises the signal that stopped it again once it has shut down; with the default handler
SIGTERM would end the process before cProfile writes its output, so here it exits normally.

With BENCH_LEDGER_BY_TIME=1, `lethe.evidence.ledger.search` is replaced by `search_by_time`: the
same filters, newest first by (at, seq) instead of by seq alone, so PostgreSQL reads a tenant's
entries of an action in a period from the (tenant, action, at) index instead of walking the
primary key backwards; the next page is the one before (at, seq) of `before_seq`. It is the
change the audit query needs, measured before it is made in `ledger.search`.
"""

from __future__ import annotations

import os
import signal
import sys
from datetime import datetime
from typing import TypeVar

from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncEngine

from lethe.cli.app import app
from lethe.contracts import LedgerEntry
from lethe.evidence import ledger
from lethe.evidence.store import ledger as table

BY_TIME = "BENCH_LEDGER_BY_TIME"
V = TypeVar("V")


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
    app(prog_name="lethe")
