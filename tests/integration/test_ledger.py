"""The ledger on the stack's PostgreSQL (and SQLite): concurrent appends chain; tampering shows."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import delete, event, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from lethe.contracts import LedgerRecord
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


def _records(prefix: str, count: int) -> list[LedgerRecord]:
    return [
        LedgerRecord(
            idempotency_key=f"{prefix}-{n}/step",
            request_id=f"{prefix}-{n}",
            subject_ref="ef" * 16,
            actor="dpo",
            action="step.done",
            system="patients-db" if n % 2 else None,
            details={"affected": n, "note": f"batch {prefix}"},
        )
        for n in range(count)
    ]


async def _statements(engine: AsyncEngine) -> list[str]:
    """The statements the engine runs from now on, in order (first words only)."""
    seen: list[str] = []

    def before(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        seen.append(" ".join(statement.split()[:2]).upper())

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    return seen


@pytest.fixture
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> datetime:
    """The ledger's clock stopped, so two chains of the same records hash alike."""
    now = datetime(2026, 12, 7, 12, 0, 0, 123456, tzinfo=UTC)
    monkeypatch.setattr(ledger, "_now", lambda: now)
    return now


async def test_append_many_chains_as_appends_one_by_one_do(
    store: AsyncEngine, tmp_path: Path, fixed_clock: datetime
) -> None:
    records = _records("many", 7)
    await ledger.append(store, **records[0].model_dump())  # a chain that does not start empty
    batched = await ledger.append_many(store, records[1:])
    apart = await engine_for(f"sqlite+aiosqlite:///{tmp_path / 'apart.db'}")
    one_by_one = [await ledger.append(apart, **record.model_dump()) for record in records]
    assert [entry.seq for entry in batched] == list(range(2, 8))
    assert batched == one_by_one[1:]
    assert await ledger.entries(store) == await ledger.entries(apart)
    report = await ledger.verify_chain(store)
    assert report.intact, report.problems
    assert report.entries == 7


async def test_append_many_is_one_transaction_of_four_statements(store: AsyncEngine) -> None:
    seen = await _statements(store)
    entries = await ledger.append_many(store, _records("tx", 50))
    assert [entry.seq for entry in entries] == list(range(1, 51))
    assert [s for s in seen if s.split()[0] in {"SELECT", "UPDATE", "INSERT"}] == [
        "SELECT LETHE_LEDGER.SEQ,",
        "UPDATE LETHE_LEDGER_HEAD",
        "INSERT INTO",
        "UPDATE LETHE_LEDGER_HEAD",
    ]


async def test_append_many_retried_returns_the_same_entries_and_writes_none(
    store: AsyncEngine,
) -> None:
    records = _records("retry", 5)
    first = await ledger.append_many(store, records[:3])
    # The retry carries the same batch and more; a key repeated in a batch is one entry.
    again = await ledger.append_many(store, [*records, records[1]])
    assert again[:3] == first
    assert again[5] == first[1]
    assert [entry.seq for entry in again[3:5]] == [4, 5]
    seen = await _statements(store)
    retried = await ledger.append_many(store, [*records, records[1]])
    assert [entry.hash for entry in retried] == [entry.hash for entry in again]
    assert [s.split()[0] for s in seen] == ["SELECT"]  # one lookup, no transaction
    assert len(await ledger.entries(store)) == 5
    assert (await ledger.verify_chain(store)).intact


async def test_concurrent_batches_sharing_keys_write_each_key_once(store: AsyncEngine) -> None:
    records = _records("race", 12)
    batches = [records[0:8], records[4:12], records[2:10], records]
    results = await asyncio.gather(*(ledger.append_many(store, batch) for batch in batches))
    by_key = {
        record.idempotency_key: entry
        for batch, entries in zip(batches, results, strict=True)
        for record, entry in zip(batch, entries, strict=True)
    }
    for batch, entries in zip(batches, results, strict=True):
        assert entries == [by_key[record.idempotency_key] for record in batch]
    report = await ledger.verify_chain(store)
    assert report.intact, report.problems
    assert report.entries == 12
