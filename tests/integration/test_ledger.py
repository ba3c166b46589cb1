"""The ledger on the stack's PostgreSQL (and SQLite): concurrent appends chain; tampering shows."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import delete, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from lethe.evidence import ledger
from lethe.evidence.store import engine_for
from lethe.evidence.store import ledger as ledger_table
from lethe.kernel.database import dispose_all


@pytest.fixture(params=["postgresql", "sqlite"])
async def store(
    request: pytest.FixtureRequest, sql_url: str, tmp_path: Path
) -> AsyncIterator[AsyncEngine]:
    """A fresh, empty store: a new PostgreSQL database on the stack, or a SQLite file."""
    if request.param == "sqlite":
        yield await engine_for(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}")
        return
    name = f"ledger_{uuid.uuid4().hex[:10]}"
    admin = create_async_engine(sql_url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = sql_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield await engine_for(url)
    finally:
        await dispose_all()
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        await admin.dispose()


async def _fill(engine: AsyncEngine, count: int) -> None:
    await asyncio.gather(
        *(
            ledger.append(
                engine,
                idempotency_key=f"req-{n}/step",
                request_id=f"req-{n}",
                subject_ref="ab" * 16,
                actor="dpo",
                action="step.done",
                system="patients-db",
                details={"affected": n},
            )
            for n in range(count)
        )
    )


async def test_concurrent_appends_form_one_unbroken_chain(store: AsyncEngine) -> None:
    await _fill(store, 25)
    report = await ledger.verify_chain(store)
    assert report.intact, report.problems
    assert report.entries == 25
    assert [e.seq for e in await ledger.entries(store)] == list(range(1, 26))


async def test_an_append_retried_with_the_same_key_is_written_once(store: AsyncEngine) -> None:
    first, again = await asyncio.gather(
        *(
            ledger.append(
                store,
                idempotency_key="req-x/erasure.started",
                request_id="req-x",
                subject_ref="cd" * 16,
                actor="dpo",
                action="erasure.started",
            )
            for _ in range(2)
        )
    )
    assert first.hash == again.hash
    assert len(await ledger.entries(store, "req-x")) == 1


async def test_an_altered_entry_is_detected(store: AsyncEngine) -> None:
    await _fill(store, 5)
    async with store.begin() as conn:
        await conn.execute(
            update(ledger_table).where(ledger_table.c.seq == 3).values(actor="someone-else")
        )
    report = await ledger.verify_chain(store)
    assert not report.intact
    assert any(p.startswith("entry 3 was altered") for p in report.problems)


async def test_a_removed_entry_is_detected(store: AsyncEngine) -> None:
    await _fill(store, 5)
    async with store.begin() as conn:
        await conn.execute(delete(ledger_table).where(ledger_table.c.seq == 2))
    report = await ledger.verify_chain(store)
    assert "entry 2 is missing (next is 3)" in report.problems
    assert "entry 3 does not link to the entry before it" in report.problems


async def test_a_removed_last_entry_is_detected_by_the_head(store: AsyncEngine) -> None:
    await _fill(store, 4)
    async with store.begin() as conn:
        await conn.execute(delete(ledger_table).where(ledger_table.c.seq == 4))
    report = await ledger.verify_chain(store)
    assert any("the head says 4" in problem for problem in report.problems)


async def test_reordered_entries_are_detected(store: AsyncEngine) -> None:
    await _fill(store, 4)
    async with store.begin() as conn:
        # swap the contents of entries 2 and 3 while keeping their sequence numbers
        rows = {
            row.seq: row
            for row in (
                await conn.execute(ledger_table.select().where(ledger_table.c.seq.in_([2, 3])))
            ).all()
        }
        await conn.execute(delete(ledger_table).where(ledger_table.c.seq.in_([2, 3])))
        for seq, other in ((2, 3), (3, 2)):
            values = dict(rows[other]._mapping)
            values.update(seq=seq, idempotency_key=f"swapped-{seq}")
            await conn.execute(ledger_table.insert().values(values))
    report = await ledger.verify_chain(store)
    assert not report.intact
    assert any("entry 2" in p for p in report.problems)
    assert any("entry 3" in p for p in report.problems)
