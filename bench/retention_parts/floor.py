"""The raw floor: the sweep's keyset-batched DELETE run directly, SQLAlchemy Core over psycopg
(Lethe's driver), one transaction per batch, until a batch deletes nothing.

The batch's keys are matched as `id = ANY(ARRAY(SELECT id ...))`, as Lethe's SQL sweep does on
PostgreSQL: with `id IN (SELECT id ...)` the planner hash-joins the batch with a scan of the
whole table once batches grow (20,000 rows of 2,000,000: about 1 s a batch instead of 0.3 s),
and the floor would measure that plan rather than the work.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import any_, bindparam, delete, func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.retention_parts.sessions import sessions

table = sessions
_due = table.c.last_seen_at < bindparam("cutoff")
_order = (table.c.last_seen_at, table.c.id)
_first = select(table.c.id).where(_due).order_by(*_order).limit(bindparam("n"))
_next = _first.where(tuple_(*_order) > tuple_(bindparam("d"), bindparam("k")))
FIRST = (
    delete(table).where(table.c.id == any_(func.array(_first.scalar_subquery()))).returning(*_order)
)
NEXT = (
    delete(table).where(table.c.id == any_(func.array(_next.scalar_subquery()))).returning(*_order)
)


async def floor_sweep(engine: AsyncEngine, cutoff: datetime, batch_size: int) -> tuple[int, int]:
    """Delete every row last seen before `cutoff`, `batch_size` a transaction, in the order of
    (last_seen_at, id), each batch after the greatest row the last one returned. The rows
    deleted and the batches (statements) it took, the last one empty."""
    cursor: tuple[datetime, int] | None = None
    removed = batches = 0
    while True:
        params: dict[str, object] = {"cutoff": cutoff, "n": batch_size}
        if cursor is not None:
            params.update(d=cursor[0], k=cursor[1])
        async with engine.begin() as conn:
            rows = (await conn.execute(NEXT if cursor is not None else FIRST, params)).all()
        batches += 1
        if not rows:
            return removed, batches
        removed += len(rows)
        cursor = max((row.last_seen_at, row.id) for row in rows)
