"""A bulk erasure's evidence in Lethe's store: its staged subjects, and its batches' Merkle trees.

The subjects of a bulk request are staged here, sealed like the forget-list's entries (AES-GCM
under LETHE_SUBJECT_KEY, bound to the reference), so that no workflow input or history holds a
list of them; each one's status is kept beside it. Each batch a phase records becomes one Merkle
tree (RFC 9162, `lethe.evidence.merkle`) whose leaves are (subject reference, step, status,
affected) and whose root goes into ONE ledger entry (`bulk.batch`): the ledger grows by a batch,
not by a subject, and each subject's outcome stays provable by an inclusion proof to a root that
the hash chain protects. `verify_bulk` recomputes every root from its leaves and compares it with
the batch row and the ledger entry.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence, Set
from datetime import UTC, datetime
from typing import Any, Protocol, get_args

from pydantic import Field
from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from lethe.contracts import (
    BULK_MAX_SUBJECTS,
    BatchStepOutcome,
    BulkSubject,
    Contract,
    StepStatus,
    Subject,
    SubjectStatus,
)
from lethe.evidence import forget_list, ledger, merkle
from lethe.evidence.forget_list import seal, unseal
from lethe.evidence.store import bulk_batches, bulk_leaves, bulk_rechecks, bulk_subjects
from lethe.evidence.store import ledger as ledger_table
from lethe.kernel.errors import LetheError
from lethe.kernel.subjects import subject_ref

STAGE_CHUNK = 5000
"""Rows per executemany when staging and when storing leaves."""
DETAIL_CHARS = 200
IN_CHUNK = 1000
"""References per `IN (...)` list."""
APPEND_TRIES = 3
PHASE_CHARS = 20
ACTION = "bulk.batch"


class BulkMalformed(LetheError):
    """Bulk input Lethe refuses: too many subjects, an unknown status, a leaf given twice."""


class BatchConflict(LetheError):
    """A batch already recorded is recorded again with other leaves: the first stands."""


class Leaf(Contract):
    """One leaf of a batch's tree: what one step did for one subject."""

    subject_ref: str
    step_id: str
    status: StepStatus
    affected: int = 0

    def data(self) -> bytes:
        """The leaf's data, as hashed into the tree (`leaf`)."""
        return leaf(self.subject_ref, self.step_id, self.status, self.affected)


class LeafLike(Protocol):
    """Anything with a leaf's four fields (a `Leaf`, a SubjectOutcome with its step's id)."""

    @property
    def subject_ref(self) -> str: ...
    @property
    def step_id(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def affected(self) -> int: ...


class BatchRecord(Contract):
    """A recorded batch: its tree's root and the ledger entry that holds it."""

    bulk_id: str
    phase: str
    batch: int
    size: int
    root: str
    ledger_seq: int
    ledger_hash: str
    recorded_at: datetime


class SubjectProof(Contract):
    """One outcome of one subject in a bulk request, with its inclusion proof: the leaf is
    (subject_ref, step_id, status, affected), leaf `index` of the batch's tree of `size`."""

    bulk_id: str
    subject_ref: str
    phase: str
    batch: int
    step_id: str
    status: str
    affected: int
    index: int
    size: int
    proof: list[str]
    root: str
    """The root the batch row holds."""
    ledger_root: str | None
    """The root the ledger entry holds (None: no entry)."""
    ledger_seq: int | None
    ledger_hash: str | None


class BulkReport(Contract):
    """What checking the bulk batches found."""

    batches: int = Field(ge=0)
    leaves: int = Field(ge=0)
    problems: list[str] = Field(default_factory=list)


def leaf(subject_ref: str, step_id: str, status: str, affected: int) -> bytes:
    """A leaf's data: the canonical JSON of the four fields (sorted keys, no spaces)."""
    body = {"affected": affected, "status": status, "step_id": step_id, "subject_ref": subject_ref}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def check_proof(proof: SubjectProof) -> bool:
    """Whether the outcome is leaf `index` under the batch's root, and that root is the one in
    the ledger entry (whose own integrity `lethe audit verify` checks with the chain)."""
    data = leaf(proof.subject_ref, proof.step_id, proof.status, proof.affected)
    included = merkle.verify_inclusion(data, proof.index, proof.size, proof.proof, proof.root)
    return included and proof.ledger_root == proof.root


def batch_key(bulk_id: str, phase: str, batch: int) -> str:
    """The ledger idempotency key of a batch's entry."""
    return f"{bulk_id}/batch/{phase}/{batch}"


# --- staged subjects ---------------------------------------------------------------------------


def _chunks(
    subjects: Iterable[Subject], subject_key: bytes, after: int = 0, skip: Set[str] = frozenset()
) -> Iterator[list[tuple[int, str, Subject]]]:
    """(seq, reference, subject) in chunks, numbered after `after`; a subject given twice is
    kept once (its first place), one in `skip` not at all."""
    seen: set[str] = set()
    chunk: list[tuple[int, str, Subject]] = []
    for subject in subjects:
        ref = subject_ref(subject.tenant, subject.subject_id, subject_key)
        if ref in seen or ref in skip:
            continue
        if after + len(seen) >= BULK_MAX_SUBJECTS:
            raise BulkMalformed(f"a bulk request takes at most {BULK_MAX_SUBJECTS} subjects")
        seen.add(ref)
        chunk.append((after + len(seen), ref, subject))
        if len(chunk) >= STAGE_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def _insert(
    conn: AsyncConnection, bulk_id: str, chunks: Iterable[list[Any]], key: bytes
) -> int:
    """Seal (in a thread, a chunk at a time) and insert the chunks' subjects; how many."""
    staged = 0
    for chunk in chunks:
        rows = await asyncio.to_thread(_sealed_rows, bulk_id, chunk, key)
        await conn.execute(insert(bulk_subjects), rows)
        staged += len(rows)
    return staged


def _sealed_rows(
    bulk_id: str, chunk: list[tuple[int, str, Subject]], subject_key: bytes
) -> list[dict[str, Any]]:
    return [
        {
            "bulk_id": bulk_id,
            "seq": seq,
            "subject_ref": ref,
            "sealed": seal(subject, ref, subject_key),
            "status": "pending",
            "detail": "",
            "batch": None,
        }
        for seq, ref, subject in chunk
    ]


async def _staged(conn: AsyncConnection, bulk_id: str) -> int:
    query = select(func.count()).select_from(bulk_subjects)
    return int((await conn.execute(query.where(bulk_subjects.c.bulk_id == bulk_id))).scalar_one())


async def stage(
    engine: AsyncEngine, bulk_id: str, subjects: Iterable[Subject], subject_key: bytes
) -> int:
    """Stage a bulk request's subjects, sealed, numbered from 1 in the order given (a subject
    given twice is staged once); how many. All or none, once: a request already staged is left
    as it is and its count returned."""
    try:
        async with engine.begin() as conn:
            already = await _staged(conn, bulk_id)
            if already:
                return already
            return await _insert(conn, bulk_id, _chunks(subjects, subject_key), subject_key)
    except IntegrityError:
        async with engine.connect() as conn:  # staged at the same time by another call
            return await _staged(conn, bulk_id)


async def append(
    engine: AsyncEngine, bulk_id: str, subjects: Sequence[Subject], subject_key: bytes
) -> int:
    """Stage more subjects after those staged already (as an offboarding finds them), a subject
    staged already left as it is; how many were new. Appending the same subjects again adds
    nothing, so a retry is harmless."""
    refs = [subject_ref(s.tenant, s.subject_id, subject_key) for s in subjects]
    tries = 0
    while True:
        try:
            async with engine.begin() as conn:
                last = await _last_seq(conn, bulk_id)
                skip = set(await _statuses(conn, bulk_id, refs))
                chunks = _chunks(subjects, subject_key, last, skip)
                return await _insert(conn, bulk_id, chunks, subject_key)
        except IntegrityError:  # another append took the same places: look again
            tries += 1
            if tries == APPEND_TRIES:
                raise


async def _last_seq(conn: AsyncConnection, bulk_id: str) -> int:
    query = select(func.max(bulk_subjects.c.seq)).where(bulk_subjects.c.bulk_id == bulk_id)
    return int((await conn.execute(query)).scalar_one() or 0)


async def take(
    engine: AsyncEngine,
    bulk_id: str,
    after_seq: int,
    limit: int,
    subject_key: bytes,
    statuses: Sequence[SubjectStatus] = ("pending",),
) -> list[tuple[int, BulkSubject]]:
    """Up to `limit` staged subjects after `after_seq` whose status is one of `statuses`, in
    order, unsealed, each with its place."""
    query = (
        select(bulk_subjects.c.seq, bulk_subjects.c.subject_ref, bulk_subjects.c.sealed)
        .where(
            bulk_subjects.c.bulk_id == bulk_id,
            bulk_subjects.c.seq > after_seq,
            bulk_subjects.c.status.in_(list(statuses)),
        )
        .order_by(bulk_subjects.c.seq)
        .limit(limit)
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [
        (
            row.seq,
            BulkSubject(
                subject_ref=row.subject_ref,
                subject=unseal(row.sealed, row.subject_ref, subject_key),
            ),
        )
        for row in rows
    ]


def _checked_status(status: str) -> str:
    if status not in get_args(SubjectStatus):
        raise BulkMalformed(f"{status[:40]!r} is not a bulk subject's status")
    return status


async def mark(
    engine: AsyncEngine,
    bulk_id: str,
    statuses: Mapping[str, tuple[SubjectStatus, str]],
    batch: int | None,
) -> None:
    """Set staged subjects' status and detail (short text, never an id), by reference; and
    their batch, unless `batch` is None (then each keeps the one it had)."""
    values: dict[str, Any] = {"status": bindparam("new_status"), "detail": bindparam("new_detail")}
    if batch is not None:
        values["batch"] = bindparam("new_batch")
    statement = (
        update(bulk_subjects)
        .where(
            bulk_subjects.c.bulk_id == bindparam("of_bulk"),
            bulk_subjects.c.subject_ref == bindparam("of_ref"),
        )
        .values(**values)
    )
    rows = [
        {
            "of_bulk": bulk_id,
            "of_ref": ref,
            "new_status": _checked_status(status),
            "new_detail": detail[:DETAIL_CHARS],
            "new_batch": batch,
        }
        for ref, (status, detail) in statuses.items()
    ]
    if not rows:
        return
    async with engine.begin() as conn:
        for start in range(0, len(rows), STAGE_CHUNK):
            await conn.execute(statement, rows[start : start + STAGE_CHUNK])


async def counts(engine: AsyncEngine, bulk_id: str) -> dict[str, int]:
    """The staged subjects by status (statuses no subject has are left out)."""
    query = (
        select(bulk_subjects.c.status, func.count())
        .where(bulk_subjects.c.bulk_id == bulk_id)
        .group_by(bulk_subjects.c.status)
    )
    async with engine.connect() as conn:
        return {row[0]: int(row[1]) for row in await conn.execute(query)}


async def statuses(
    engine: AsyncEngine, bulk_id: str, refs: Sequence[str]
) -> dict[str, SubjectStatus]:
    """The status of each of `refs` staged in the request (a reference not staged is left out)."""
    async with engine.connect() as conn:
        return await _statuses(conn, bulk_id, refs)


async def _statuses(
    conn: AsyncConnection, bulk_id: str, refs: Sequence[str]
) -> dict[str, SubjectStatus]:
    found: dict[str, SubjectStatus] = {}
    for start in range(0, len(refs), IN_CHUNK):
        query = select(bulk_subjects.c.subject_ref, bulk_subjects.c.status).where(
            bulk_subjects.c.bulk_id == bulk_id,
            bulk_subjects.c.subject_ref.in_(list(refs[start : start + IN_CHUNK])),
        )
        found.update({row[0]: row[1] for row in await conn.execute(query)})
    return found


# --- batches and their trees --------------------------------------------------------------------


def _leaves(given: Sequence[LeafLike]) -> list[Leaf]:
    """The leaves as `Leaf`s (those that are already one kept as they are: validated when
    made), each (subject, step) once."""
    leaves = [
        item
        if isinstance(item, Leaf)
        else Leaf.model_validate(
            {
                "subject_ref": item.subject_ref,
                "step_id": item.step_id,
                "status": item.status,
                "affected": item.affected,
            }
        )
        for item in given
    ]
    pairs = Counter((item.subject_ref, item.step_id) for item in leaves)
    twice = sum(1 for n in pairs.values() if n > 1)
    if twice:
        raise BulkMalformed(f"{twice} (subject, step) pairs are given more than once in a batch")
    return leaves


def _details(phase: str, batch: int, root: str, leaves: Sequence[Leaf]) -> ledger.Details:
    details: ledger.Details = {
        "phase": phase,
        "batch": batch,
        "root": root,
        "leaves": len(leaves),
        "subjects": len({item.subject_ref for item in leaves}),
    }
    details.update(sorted(Counter(item.status for item in leaves).items()))
    return details


async def _ledger_entry(conn: AsyncConnection, key: str) -> Any:
    query = select(
        ledger_table.c.seq, ledger_table.c.hash, ledger_table.c.details, ledger_table.c.at
    ).where(ledger_table.c.idempotency_key == key)
    return (await conn.execute(query)).first()


async def _recorded(
    engine: AsyncEngine, bulk_id: str, phase: str, batch: int
) -> BatchRecord | None:
    """The batch as recorded (its row and ledger entry), if it is."""
    query = select(bulk_batches).where(
        bulk_batches.c.bulk_id == bulk_id,
        bulk_batches.c.phase == phase,
        bulk_batches.c.batch == batch,
    )
    async with engine.connect() as conn:
        row = (await conn.execute(query)).first()
        if row is None:
            return None
        entry = await _ledger_entry(conn, batch_key(bulk_id, phase, batch))
    return BatchRecord(
        bulk_id=bulk_id,
        phase=phase,
        batch=batch,
        size=row.size,
        root=row.root,
        ledger_seq=entry.seq if entry is not None else 0,
        ledger_hash=row.ledger_hash,
        recorded_at=_utc(row.recorded_at),
    )


def _same(record: BatchRecord, root: str, size: int) -> BatchRecord:
    if (record.root, record.size) != (root, size):
        raise BatchConflict(
            f"batch {record.batch} ({record.phase}) of {record.bulk_id} is recorded already with "
            "other outcomes; the first record stands"
        )
    return record


async def record_batch(
    engine: AsyncEngine,
    bulk_id: str,
    phase: str,
    batch: int,
    leaves: Sequence[LeafLike],
    actor: str,
    tenant: str | None = None,
) -> BatchRecord:
    """Record batch `batch` of a phase (`immediate`, `deferred`, ...): its leaves (in the order
    given), their Merkle root in one `bulk.batch` ledger entry, and the batch row. Recording the
    same batch again returns its record; other leaves for a batch already recorded are refused
    (`BatchConflict`)."""
    if not 0 < len(phase) <= PHASE_CHARS:
        raise BulkMalformed(f"a phase's name has 1 to {PHASE_CHARS} characters")
    rows = _leaves(leaves)
    root = merkle.root([item.data() for item in rows])
    earlier = await _recorded(engine, bulk_id, phase, batch)
    if earlier is not None:
        return _same(earlier, root, len(rows))
    entry = await ledger.append(
        engine,
        idempotency_key=batch_key(bulk_id, phase, batch),
        request_id=bulk_id,
        subject_ref="-",
        actor=actor,
        action=ACTION,
        system=None,
        details=_details(phase, batch, root, rows),
        tenant=tenant,
    )
    if (entry.details.get("root"), entry.details.get("leaves")) != (root, len(rows)):
        raise BatchConflict(
            f"the ledger holds batch {batch} ({phase}) of {bulk_id} with other outcomes already "
            f"(entry {entry.seq}); the first record stands"
        )
    record = BatchRecord(
        bulk_id=bulk_id,
        phase=phase,
        batch=batch,
        size=len(rows),
        root=root,
        ledger_seq=entry.seq,
        ledger_hash=entry.hash,
        recorded_at=entry.at,
    )
    try:
        await _store_batch(engine, record, rows)
    except IntegrityError:
        raced = await _recorded(engine, bulk_id, phase, batch)
        if raced is None:
            raise
        return _same(raced, root, len(rows))
    return record


async def _store_batch(engine: AsyncEngine, record: BatchRecord, rows: Sequence[Leaf]) -> None:
    """The batch row and its leaves, in one transaction."""
    where = {"bulk_id": record.bulk_id, "phase": record.phase, "batch": record.batch}
    values = [{**where, "idx": idx, **item.model_dump()} for idx, item in enumerate(rows)]
    async with engine.begin() as conn:
        await conn.execute(
            insert(bulk_batches).values(
                **where,
                size=record.size,
                root=record.root,
                ledger_hash=record.ledger_hash,
                recorded_at=record.recorded_at,
            )
        )
        for start in range(0, len(values), STAGE_CHUNK):
            await conn.execute(insert(bulk_leaves), values[start : start + STAGE_CHUNK])


# --- proofs and verification --------------------------------------------------------------------


def _utc(at: datetime) -> datetime:
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _row_leaf(row: Any) -> bytes:
    return leaf(row.subject_ref, row.step_id, row.status, row.affected)


async def _batch_leaves(conn: AsyncConnection, bulk_id: str, phase: str, batch: int) -> list[Any]:
    query = (
        select(bulk_leaves)
        .where(
            bulk_leaves.c.bulk_id == bulk_id,
            bulk_leaves.c.phase == phase,
            bulk_leaves.c.batch == batch,
        )
        .order_by(bulk_leaves.c.idx)
    )
    return list((await conn.execute(query)).all())


async def _batch_proofs(
    conn: AsyncConnection, bulk_id: str, phase: str, batch: int, mine: Sequence[Any]
) -> list[SubjectProof]:
    """The proofs of `mine`, leaf rows of one batch, from the batch's leaves, its row and its
    ledger entry."""
    rows = await _batch_leaves(conn, bulk_id, phase, batch)
    data = [_row_leaf(row) for row in rows]
    places = {row.idx: index for index, row in enumerate(rows)}
    where = (
        bulk_batches.c.bulk_id == bulk_id,
        bulk_batches.c.phase == phase,
        bulk_batches.c.batch == batch,
    )
    root = (await conn.execute(select(bulk_batches.c.root).where(*where))).scalar()
    entry = await _ledger_entry(conn, batch_key(bulk_id, phase, batch))
    return [
        SubjectProof(
            bulk_id=bulk_id,
            subject_ref=row.subject_ref,
            phase=phase,
            batch=batch,
            step_id=row.step_id,
            status=row.status,
            affected=row.affected,
            index=places[row.idx],
            size=len(rows),
            proof=merkle.inclusion_proof(data, places[row.idx]),
            root=root or "",
            ledger_root=str(entry.details.get("root")) if entry is not None else None,
            ledger_seq=entry.seq if entry is not None else None,
            ledger_hash=entry.hash if entry is not None else None,
        )
        for row in mine
    ]


async def proofs(engine: AsyncEngine, bulk_id: str, subject_ref: str) -> list[SubjectProof]:
    """Every outcome recorded for the subject in the bulk request, each with its proof, in the
    order recorded (by ledger entry, then place in the batch)."""
    query = (
        select(bulk_leaves)
        .where(bulk_leaves.c.bulk_id == bulk_id, bulk_leaves.c.subject_ref == subject_ref)
        .order_by(bulk_leaves.c.phase, bulk_leaves.c.batch, bulk_leaves.c.idx)
    )
    found: list[SubjectProof] = []
    async with engine.connect() as conn:
        mine = (await conn.execute(query)).all()
        batches = sorted({(row.phase, row.batch) for row in mine})
        for phase, batch in batches:
            rows = [row for row in mine if (row.phase, row.batch) == (phase, batch)]
            found += await _batch_proofs(conn, bulk_id, phase, batch, rows)
    return sorted(found, key=lambda p: (p.ledger_seq or 0, p.index))


BatchId = tuple[str, str, int]


def _batch_problems(
    name: str, row: Any, found: tuple[str, int] | None, entry: Any
) -> Iterator[str]:
    """What is wrong with one batch: its row against its leaves' root and its ledger entry."""
    if found is None:
        yield f"{name}: its leaves are missing"
    else:
        root, size = found
        if root != row.root:
            yield f"{name}: its leaves do not hash to its root (a leaf or the root was altered)"
        if size != row.size:
            yield f"{name}: {size} leaves, but the batch says {row.size}"
    if entry is None:
        yield f"{name}: no ledger entry holds its root"
        return
    if entry.hash != row.ledger_hash:
        yield f"{name}: the ledger entry is not the one the batch names"
    if entry.details.get("root") != row.root:
        yield f"{name}: its root differs from the one in ledger entry {entry.seq}"
    if entry.details.get("leaves") != row.size:
        yield f"{name}: its size differs from the one in ledger entry {entry.seq}"


async def batches(engine: AsyncEngine, bulk_id: str) -> list[BatchRecord]:
    """Every batch a bulk request recorded, in order: its root and the ledger entry holding it
    (what a bulk certificate lists)."""
    query = (
        select(bulk_batches, ledger_table.c.seq)
        .join(ledger_table, ledger_table.c.hash == bulk_batches.c.ledger_hash)
        .where(bulk_batches.c.bulk_id == bulk_id)
        .order_by(bulk_batches.c.batch, bulk_batches.c.phase)
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [
        BatchRecord(
            bulk_id=row.bulk_id,
            phase=row.phase,
            batch=row.batch,
            size=row.size,
            root=row.root,
            ledger_seq=row.seq,
            ledger_hash=row.ledger_hash,
            recorded_at=_utc(row.recorded_at),
        )
        for row in rows
    ]


async def _trees(conn: AsyncConnection, bulk_id: str | None) -> dict[BatchId, tuple[str, int]]:
    """Each batch's root recomputed from its stored leaves, and how many leaves it has."""
    query = select(bulk_leaves).order_by(
        bulk_leaves.c.bulk_id, bulk_leaves.c.phase, bulk_leaves.c.batch, bulk_leaves.c.idx
    )
    if bulk_id is not None:
        query = query.where(bulk_leaves.c.bulk_id == bulk_id)
    trees: dict[BatchId, tuple[str, int]] = {}
    current: BatchId | None = None
    data: list[bytes] = []
    async for row in await conn.stream(query):
        at = (row.bulk_id, row.phase, row.batch)
        if at != current and current is not None:
            trees[current] = (merkle.root(data), len(data))
            data = []
        current = at
        data.append(_row_leaf(row))
    if current is not None:
        trees[current] = (merkle.root(data), len(data))
    return trees


async def _entries(conn: AsyncConnection, bulk_id: str | None) -> dict[str, Any]:
    """The `bulk.batch` ledger entries, by idempotency key."""
    query = select(
        ledger_table.c.seq,
        ledger_table.c.hash,
        ledger_table.c.details,
        ledger_table.c.idempotency_key,
    ).where(ledger_table.c.action == ACTION)
    if bulk_id is not None:
        query = query.where(ledger_table.c.request_id == bulk_id)
    return {row.idempotency_key: row for row in await conn.execute(query)}


async def bulk_report(engine: AsyncEngine, bulk_id: str | None = None) -> BulkReport:
    """Check every batch (of one bulk request, or all): its root recomputed from its leaves,
    equal to the batch row's and to the root in its ledger entry; and every `bulk.batch` ledger
    entry has its batch."""
    batches = select(bulk_batches).order_by(
        bulk_batches.c.bulk_id, bulk_batches.c.phase, bulk_batches.c.batch
    )
    if bulk_id is not None:
        batches = batches.where(bulk_batches.c.bulk_id == bulk_id)
    async with engine.connect() as conn:
        rows = (await conn.execute(batches)).all()
        trees = await _trees(conn, bulk_id)
        entries = await _entries(conn, bulk_id)
    leaves = sum(size for _, size in trees.values())
    problems: list[str] = []
    for row in rows:
        name = f"bulk {row.bulk_id} batch {row.batch} ({row.phase})"
        key = batch_key(row.bulk_id, row.phase, row.batch)
        found = trees.pop((row.bulk_id, row.phase, row.batch), None)
        problems += _batch_problems(name, row, found, entries.pop(key, None))
    problems += [f"bulk {b} batch {n} ({p}): leaves without a batch" for b, p, n in trees]
    problems += [
        f"ledger entry {entry.seq} records a bulk batch the store does not hold"
        for entry in entries.values()
    ]
    return BulkReport(batches=len(rows), leaves=leaves, problems=problems)


async def verify_bulk(engine: AsyncEngine, bulk_id: str | None = None) -> list[str]:
    """The problems `bulk_report` finds (none: every batch checks out)."""
    return (await bulk_report(engine, bulk_id)).problems


# --- steps to verify again once the window has ended --------------------------------------------


class Recheck(Contract):
    """A step of a batch to verify again: what it did for the batch's subjects."""

    batch: int
    step_id: str
    outcome: BatchStepOutcome


async def keep_rechecks(
    engine: AsyncEngine, bulk_id: str, batch: int, outcomes: Sequence[BatchStepOutcome]
) -> int:
    """Keep each step of the batch that left a subject `pending_compaction`, to verify again at
    the window's end (once: kept again, it is left as it is); how many were new."""
    pending = [o for o in outcomes if any(s.status == "pending_compaction" for s in o.outcomes)]
    kept = 0
    async with engine.begin() as conn:
        for outcome in pending:
            there = await conn.execute(
                select(bulk_rechecks.c.done).where(
                    bulk_rechecks.c.bulk_id == bulk_id,
                    bulk_rechecks.c.batch == batch,
                    bulk_rechecks.c.step_id == outcome.step_id,
                )
            )
            if there.first() is None:
                await conn.execute(
                    insert(bulk_rechecks).values(
                        bulk_id=bulk_id,
                        batch=batch,
                        step_id=outcome.step_id,
                        outcome=outcome.model_dump(mode="json"),
                        done=False,
                    )
                )
                kept += 1
    return kept


async def next_recheck(engine: AsyncEngine, bulk_id: str) -> Recheck | None:
    """The first step still to verify again, in batch and step order; None when none is left."""
    query = (
        select(bulk_rechecks)
        .where(bulk_rechecks.c.bulk_id == bulk_id, bulk_rechecks.c.done.is_(False))
        .order_by(bulk_rechecks.c.batch, bulk_rechecks.c.step_id)
        .limit(1)
    )
    async with engine.connect() as conn:
        row = (await conn.execute(query)).first()
    if row is None:
        return None
    return Recheck(
        batch=row.batch,
        step_id=row.step_id,
        outcome=BatchStepOutcome.model_validate(row.outcome),
    )


async def recheck_done(
    engine: AsyncEngine, bulk_id: str, batch: int, step_id: str, verified: BatchStepOutcome
) -> None:
    """Mark a step verified again, keeping what the verification found."""
    async with engine.begin() as conn:
        await conn.execute(
            update(bulk_rechecks)
            .where(
                bulk_rechecks.c.bulk_id == bulk_id,
                bulk_rechecks.c.batch == batch,
                bulk_rechecks.c.step_id == step_id,
            )
            .values(done=True, outcome=verified.model_dump(mode="json"))
        )


async def still_pending(engine: AsyncEngine, bulk_id: str, batch: int) -> set[str]:
    """The subjects of a batch that a step not yet verified again left `pending_compaction`."""
    query = select(bulk_rechecks.c.outcome).where(
        bulk_rechecks.c.bulk_id == bulk_id,
        bulk_rechecks.c.batch == batch,
        bulk_rechecks.c.done.is_(False),
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return {
        one.subject_ref
        for row in rows
        for one in BatchStepOutcome.model_validate(row.outcome).outcomes
        if one.status == "pending_compaction"
    }


async def subjects_of(
    engine: AsyncEngine, bulk_id: str, refs: Sequence[str], subject_key: bytes
) -> list[BulkSubject]:
    """The staged subjects of `refs`, unsealed, in the order of `refs`."""
    found: dict[str, BulkSubject] = {}
    async with engine.connect() as conn:
        for start in range(0, len(refs), 1000):
            rows = await conn.execute(
                select(bulk_subjects.c.subject_ref, bulk_subjects.c.sealed).where(
                    bulk_subjects.c.bulk_id == bulk_id,
                    bulk_subjects.c.subject_ref.in_(list(refs[start : start + 1000])),
                )
            )
            for ref, sealed in rows:
                found[ref] = BulkSubject(subject_ref=ref, subject=unseal(sealed, ref, subject_key))
    return [found[ref] for ref in refs if ref in found]


async def found(engine: AsyncEngine, bulk_id: str, refs: Sequence[str]) -> list[str]:
    """Which of `refs` the immediate phase found somewhere (a step changed something of
    theirs): whole backups are touched only for them."""
    query = (
        select(bulk_leaves.c.subject_ref)
        .where(
            bulk_leaves.c.bulk_id == bulk_id,
            bulk_leaves.c.phase == "immediate",
            bulk_leaves.c.affected > 0,
            bulk_leaves.c.subject_ref.in_(list(refs)),
        )
        .distinct()
    )
    async with engine.connect() as conn:
        return sorted(row[0] for row in await conn.execute(query))


async def forget(
    engine: AsyncEngine, bulk_id: str, refs: Sequence[str], *, tenant: str, systems: list[str]
) -> None:
    """List a batch's subjects on the forget-list (those not listed already), with the sealed
    subject copied from the staging table (both seal one way, bound to the reference)."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(bulk_subjects.c.subject_ref, bulk_subjects.c.sealed).where(
                bulk_subjects.c.bulk_id == bulk_id, bulk_subjects.c.subject_ref.in_(list(refs))
            )
        )
        sealed = [(ref, text) for ref, text in rows]
    await forget_list.add_sealed(engine, sealed, tenant=tenant, request_id=bulk_id, systems=systems)
