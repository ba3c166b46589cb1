"""A bulk erasure's evidence in Lethe's store, on the stack's PostgreSQL and on SQLite: 100,000
subjects staged sealed and taken back in batches, a batch's outcomes recorded as one Merkle root
in one ledger entry, each subject's inclusion proof, and tampering with a leaf, a root or a batch
found by `verify_bulk`, by the proofs and by `lethe audit verify`."""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from typer.testing import CliRunner, Result

from lethe.cli.audit import audit_app
from lethe.contracts import StepStatus, Subject
from lethe.evidence import bulk, ledger, merkle
from lethe.evidence.bulk import BatchConflict, Leaf
from lethe.evidence.store import bulk_batches, bulk_leaves, bulk_subjects, engine_for
from lethe.evidence.store import ledger as ledger_table
from lethe.kernel.database import dispose_all
from lethe.kernel.subjects import subject_ref

KEY = b"k" * 32
TENANT = "st-mary"
STEPS = ("patients-db", "events-topic", "keys")
MANY = 100_000


class Store:
    """A fresh store, its URL (for the CLI) and its engine."""

    def __init__(self, url: str, engine: AsyncEngine) -> None:
        self.url, self.engine = url, engine


@pytest.fixture(params=["postgresql", "sqlite"])
async def store(
    request: pytest.FixtureRequest, sql_url: str, tmp_path: Path
) -> AsyncIterator[Store]:
    """A new, empty store: a new PostgreSQL database on the stack, or a SQLite file."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'bulk.db'}"
        yield Store(url, await engine_for(url))
        await dispose_all()
        return
    name = f"bulk_{uuid.uuid4().hex[:10]}"
    admin = create_async_engine(sql_url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = sql_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield Store(url, await engine_for(url))
    finally:
        await dispose_all()
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        await admin.dispose()


def _subject(n: int) -> Subject:
    return Subject(
        tenant=TENANT, subject_id=f"p-{n:06d}", identities={"email": f"p{n}@example.org"}
    )


def _ref(n: int) -> str:
    return subject_ref(TENANT, f"p-{n:06d}", KEY)


def _status(n: int, step: str) -> StepStatus:
    """A mix of outcomes: every 50th subject's key shred failed, Kafka awaits compaction."""
    if step == "keys" and n % 50 == 0:
        return "failed"
    return "pending_compaction" if step == "events-topic" else "done"


def _leaves(numbers: list[int]) -> list[Leaf]:
    """Each subject's three steps, step by step, subjects in the batch's order."""
    return [
        Leaf(
            subject_ref=_ref(n),
            step_id=f"{step}-1",
            status=_status(n, step),
            affected=n % 7 if step == "patients-db" else 1,
        )
        for step in STEPS
        for n in numbers
    ]


async def _stage(engine: AsyncEngine, bulk_id: str, count: int) -> int:
    return await bulk.stage(engine, bulk_id, (_subject(n) for n in range(1, count + 1)), KEY)


async def test_100000_subjects_are_staged_taken_marked_recorded_and_proven(store: Store) -> None:
    engine, bulk_id = store.engine, "bulk-0123456789ab"
    started = time.perf_counter()
    staged = await _stage(engine, bulk_id, MANY)
    staging = time.perf_counter() - started
    print(f"\n[{engine.dialect.name}] staged {staged} subjects in {staging:.2f} s")
    assert staged == MANY
    assert await bulk.counts(engine, bulk_id) == {"pending": MANY}
    async with engine.connect() as conn:
        sealed = (
            await conn.execute(select(bulk_subjects.c.sealed).where(bulk_subjects.c.seq == 7))
        ).scalar_one()
    assert "p-000007" not in sealed and "example.org" not in sealed
    # Staging again (a retry) adds nothing.
    assert await _stage(engine, bulk_id, 10) == MANY

    started, seen, after = time.perf_counter(), 0, 0
    while batch := await bulk.take(engine, bulk_id, after, 500, KEY):
        assert [seq for seq, _ in batch] == list(range(after + 1, after + len(batch) + 1))
        seen, after = seen + len(batch), batch[-1][0]
    print(
        f"[{engine.dialect.name}] took {seen} subjects in batches of 500 in "
        f"{time.perf_counter() - started:.2f} s"
    )
    assert seen == MANY
    first = await bulk.take(engine, bulk_id, 0, 500, KEY)
    assert [item.subject for _, item in first[:3]] == [_subject(1), _subject(2), _subject(3)]
    assert [item.subject_ref for _, item in first[:3]] == [_ref(1), _ref(2), _ref(3)]

    numbers = list(range(1, 501))
    record = await bulk.record_batch(engine, bulk_id, "immediate", 0, _leaves(numbers), "lethe")
    assert (record.size, record.root) == (1500, merkle.root([x.data() for x in _leaves(numbers)]))
    await bulk.mark(
        engine,
        bulk_id,
        {_ref(n): ("failed" if n % 50 == 0 else "erased", "") for n in numbers},
        0,
    )
    assert await bulk.counts(engine, bulk_id) == {
        "pending": MANY - 500,
        "erased": 490,
        "failed": 10,
    }
    assert await bulk.statuses(engine, bulk_id, [_ref(50), _ref(51), _ref(501)]) == {
        _ref(50): "failed",
        _ref(51): "erased",
        _ref(501): "pending",
    }
    # Taking pending subjects now starts after the marked batch.
    assert (await bulk.take(engine, bulk_id, 0, 2, KEY))[0][0] == 501

    entries = await ledger.entries(engine, bulk_id)
    assert len(entries) == 1
    assert entries[0].action == "bulk.batch" and entries[0].subject_ref == "-"
    assert entries[0].details == {
        "phase": "immediate",
        "batch": 0,
        "root": record.root,
        "leaves": 1500,
        "subjects": 500,
        "done": 990,
        "failed": 10,
        "pending_compaction": 500,
    }
    assert (entries[0].seq, entries[0].hash) == (record.ledger_seq, record.ledger_hash)

    for n in [*random.Random(12).sample(numbers, 25), 1, 50, 500]:
        proofs = await bulk.proofs(engine, bulk_id, _ref(n))
        assert [(p.step_id, p.status) for p in proofs] == [
            (f"{step}-1", _status(n, step)) for step in STEPS
        ]
        assert all(bulk.check_proof(p) for p in proofs), n
        assert {(p.root, p.ledger_seq, p.size) for p in proofs} == {
            (record.root, record.ledger_seq, 1500)
        }
    assert await bulk.proofs(engine, bulk_id, _ref(501)) == []
    report = await bulk.bulk_report(engine)
    assert (report.batches, report.leaves, report.problems) == (1, 1500, [])
    assert (await ledger.verify_chain(engine)).intact


async def test_recording_a_batch_again_is_idempotent_and_other_leaves_are_refused(
    store: Store,
) -> None:
    engine, bulk_id = store.engine, "bulk-00000000000a"
    await _stage(engine, bulk_id, 20)
    leaves = _leaves(list(range(1, 11)))
    first = await bulk.record_batch(engine, bulk_id, "immediate", 0, leaves, "lethe")
    again = await bulk.record_batch(engine, bulk_id, "immediate", 0, leaves, "lethe")
    assert again == first
    changed = [leaves[0].model_copy(update={"status": "failed"}), *leaves[1:]]
    with pytest.raises(BatchConflict, match="recorded already with other outcomes"):
        await bulk.record_batch(engine, bulk_id, "immediate", 0, changed, "lethe")
    # The same batch number in another phase is another batch.
    deferred = await bulk.record_batch(engine, bulk_id, "deferred", 0, leaves[:10], "lethe")
    assert deferred.root != first.root and deferred.ledger_seq == first.ledger_seq + 1
    assert len(await ledger.entries(engine, bulk_id)) == 2
    with pytest.raises(bulk.BulkMalformed, match="more than once"):
        await bulk.record_batch(engine, bulk_id, "immediate", 1, leaves + leaves[:1], "lethe")
    assert await bulk.verify_bulk(engine, bulk_id) == []
    proofs = await bulk.proofs(engine, bulk_id, _ref(1))
    assert [(p.phase, p.step_id) for p in proofs] == [
        ("immediate", "patients-db-1"),
        ("immediate", "events-topic-1"),
        ("immediate", "keys-1"),
        ("deferred", "patients-db-1"),
    ]
    assert all(bulk.check_proof(p) for p in proofs)


async def test_a_batch_whose_rows_were_lost_after_its_ledger_entry_is_completed_by_a_retry(
    store: Store,
) -> None:
    """The ledger entry is written first: a crash before the rows leaves the entry, which
    `verify_bulk` reports until the retried activity writes the rows under the same entry."""
    engine, bulk_id = store.engine, "bulk-000000000011"
    leaves = _leaves(list(range(1, 6)))
    first = await bulk.record_batch(engine, bulk_id, "immediate", 0, leaves, "lethe")
    async with engine.begin() as conn:
        await conn.execute(delete(bulk_leaves).where(bulk_leaves.c.bulk_id == bulk_id))
        await conn.execute(delete(bulk_batches).where(bulk_batches.c.bulk_id == bulk_id))
    assert await bulk.verify_bulk(engine, bulk_id) == [
        f"ledger entry {first.ledger_seq} records a bulk batch the store does not hold"
    ]
    retried = await bulk.record_batch(engine, bulk_id, "immediate", 0, leaves, "lethe")
    assert (retried.ledger_seq, retried.ledger_hash, retried.root) == (
        first.ledger_seq,
        first.ledger_hash,
        first.root,
    )
    assert await bulk.verify_bulk(engine, bulk_id) == []
    assert len(await ledger.entries(engine, bulk_id)) == 1
    with pytest.raises(BatchConflict, match="the ledger holds batch 0"):
        async with engine.begin() as conn:
            await conn.execute(delete(bulk_leaves).where(bulk_leaves.c.bulk_id == bulk_id))
            await conn.execute(delete(bulk_batches).where(bulk_batches.c.bulk_id == bulk_id))
        await bulk.record_batch(engine, bulk_id, "immediate", 0, leaves[1:], "lethe")


async def _two_batches(engine: AsyncEngine, bulk_id: str) -> None:
    await _stage(engine, bulk_id, 40)
    await bulk.record_batch(engine, bulk_id, "immediate", 0, _leaves(list(range(1, 21))), "lethe")
    await bulk.record_batch(engine, bulk_id, "immediate", 1, _leaves(list(range(21, 41))), "lethe")


def _audit_verify(url: str) -> Result:
    """`lethe audit verify` through typer's runner, against the store at `url` (the command
    ends the process with os._exit: here that is the runner's SystemExit)."""

    def exit_(code: int) -> None:
        raise SystemExit(code)

    real_exit, os._exit = os._exit, exit_  # type: ignore[assignment]
    try:
        return CliRunner().invoke(
            audit_app, ["verify"], env={"LETHE_STORE_URL": url, "COLUMNS": "200"}
        )
    finally:
        os._exit = real_exit


async def _cli(store: Store) -> Result:
    """The command in a thread of its own (it runs its own event loop), the engines of this
    loop closed first so it makes its own."""
    await dispose_all()
    return await asyncio.to_thread(_audit_verify, store.url)


async def test_a_tampered_leaf_is_found_by_the_check_the_proof_and_the_cli(store: Store) -> None:
    engine, bulk_id = store.engine, "bulk-00000000000b"
    await _two_batches(engine, bulk_id)
    intact = await _cli(store)
    assert intact.exit_code == 0, intact.output
    assert "ledger intact: 2 entries" in intact.output
    assert "bulk batches intact: 2 bulk batches, 120 leaves" in intact.output

    # Subject 30's Kafka step, still awaiting compaction, is made "done" in the store.
    async with engine.begin() as conn:
        changed = await conn.execute(
            update(bulk_leaves)
            .where(bulk_leaves.c.subject_ref == _ref(30), bulk_leaves.c.step_id == "events-topic-1")
            .values(status="done")
        )
        assert changed.rowcount == 1
    assert await bulk.verify_bulk(engine) == [
        f"bulk {bulk_id} batch 1 (immediate): its leaves do not hash to its root "
        "(a leaf or the root was altered)"
    ]
    tampered = await bulk.proofs(engine, bulk_id, _ref(30))
    assert [p.status for p in tampered] == ["done", "done", "done"]
    assert not any(bulk.check_proof(p) for p in tampered)
    # The other batch's proofs still hold.
    assert all(bulk.check_proof(p) for p in await bulk.proofs(engine, bulk_id, _ref(3)))

    broken = await _cli(store)
    assert broken.exit_code == 1, broken.output
    assert "ledger intact: 2 entries" in broken.output  # the ledger itself was not touched
    assert "bulk batches checked: 2 bulk batches, 120 leaves" in broken.output
    assert f"broken: bulk {bulk_id} batch 1 (immediate): its leaves do not hash" in broken.output


async def test_a_tampered_root_is_found_by_the_check_and_every_proof_of_its_batch(
    store: Store,
) -> None:
    engine, bulk_id = store.engine, "bulk-00000000000c"
    await _two_batches(engine, bulk_id)
    forged = merkle.root([b"forged"])
    async with engine.begin() as conn:
        await conn.execute(
            update(bulk_batches).where(bulk_batches.c.batch == 0).values(root=forged)
        )
    entry = (await ledger.entries(engine, bulk_id))[0]
    assert await bulk.verify_bulk(engine, bulk_id) == [
        f"bulk {bulk_id} batch 0 (immediate): its leaves do not hash to its root "
        "(a leaf or the root was altered)",
        f"bulk {bulk_id} batch 0 (immediate): its root differs from the one in ledger entry "
        f"{entry.seq}",
    ]
    for n in (1, 7, 20):
        proofs = await bulk.proofs(engine, bulk_id, _ref(n))
        assert len(proofs) == 3 and {p.root for p in proofs} == {forged}
        assert not any(bulk.check_proof(p) for p in proofs)
    assert all(bulk.check_proof(p) for p in await bulk.proofs(engine, bulk_id, _ref(21)))

    broken = await _cli(store)
    assert broken.exit_code == 1, broken.output
    assert "its root differs from the one in ledger entry" in broken.output


async def test_a_batch_removed_from_the_store_is_found_through_its_ledger_entry(
    store: Store,
) -> None:
    """Deleting a batch with its leaves leaves its ledger entry (which the chain protects)."""
    engine, bulk_id = store.engine, "bulk-00000000000d"
    await _two_batches(engine, bulk_id)
    async with engine.begin() as conn:
        await conn.execute(delete(bulk_leaves).where(bulk_leaves.c.batch == 1))
        await conn.execute(delete(bulk_batches).where(bulk_batches.c.batch == 1))
        seq = (
            await conn.execute(
                select(func.max(ledger_table.c.seq)).where(ledger_table.c.action == "bulk.batch")
            )
        ).scalar_one()
    assert await bulk.verify_bulk(engine) == [
        f"ledger entry {seq} records a bulk batch the store does not hold"
    ]
    assert await bulk.proofs(engine, bulk_id, _ref(30)) == []


async def test_subjects_found_later_are_appended_once_in_order(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, bulk_id = store.engine, "bulk-00000000000e"
    assert await _stage(engine, bulk_id, 10) == 10
    found = [_subject(n) for n in (8, 11, 9, 12, 11)]
    assert await bulk.append(engine, bulk_id, found, KEY) == 2
    assert await bulk.append(engine, bulk_id, found, KEY) == 0  # a retry adds nothing
    taken = await bulk.take(engine, bulk_id, 9, 10, KEY)
    assert [(seq, item.subject_ref) for seq, item in taken] == [
        (10, _ref(10)),
        (11, _ref(11)),
        (12, _ref(12)),
    ]
    assert await bulk.append(engine, "bulk-00000000000f", found[:2], KEY) == 2  # a new request

    await bulk.mark(engine, bulk_id, {_ref(1): ("erased", ""), _ref(2): ("failed", "x" * 300)}, 4)
    await bulk.mark(engine, bulk_id, {_ref(1): ("incomplete", "kafka awaits compaction")}, None)
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(bulk_subjects.c.status, bulk_subjects.c.detail, bulk_subjects.c.batch)
                .where(bulk_subjects.c.bulk_id == bulk_id, bulk_subjects.c.seq <= 2)
                .order_by(bulk_subjects.c.seq)
            )
        ).all()
    assert [tuple(row) for row in rows] == [
        ("incomplete", "kafka awaits compaction", 4),  # no batch given: it keeps its own
        ("failed", "x" * 200, 4),
    ]
    with pytest.raises(bulk.BulkMalformed, match="not a bulk subject's status"):
        await bulk.mark(engine, bulk_id, {_ref(3): ("gone", "")}, 1)  # type: ignore[dict-item]

    monkeypatch.setattr(bulk, "BULK_MAX_SUBJECTS", 12)
    with pytest.raises(bulk.BulkMalformed, match="at most 12 subjects"):
        await _stage(engine, "bulk-000000000010", 13)
    assert await bulk.counts(engine, "bulk-000000000010") == {}
    with pytest.raises(bulk.BulkMalformed, match="at most 12 subjects"):
        await bulk.append(engine, bulk_id, [_subject(13)], KEY)
