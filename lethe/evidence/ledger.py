"""The audit ledger: append-only and hash-chained, so an altered, removed or reordered entry shows.

Each entry's hash covers its fields and the previous entry's hash. Entries carry the subject
reference only, never an identifier. An append names an idempotency key, so an activity retried
after a crash does not write its entry twice.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from lethe.contracts import LedgerEntry
from lethe.evidence.store import GENESIS_HASH, ledger, ledger_head

Details = dict[str, str | int | float | bool | None]


def entry_hash(
    seq: int,
    at: datetime,
    request_id: str,
    subject_ref: str,
    actor: str,
    action: str,
    system: str | None,
    details: Details,
    prev_hash: str,
) -> str:
    """SHA-256 over the canonical JSON of an entry's fields and the previous hash."""
    body = {
        "seq": seq,
        "at": at.astimezone(UTC).isoformat(timespec="microseconds"),
        "request_id": request_id,
        "subject_ref": subject_ref,
        "actor": actor,
        "action": action,
        "system": system,
        "details": details,
        "prev_hash": prev_hash,
    }
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


async def append(
    engine: AsyncEngine,
    *,
    idempotency_key: str,
    request_id: str,
    subject_ref: str,
    actor: str,
    action: str,
    system: str | None = None,
    details: Details | None = None,
) -> LedgerEntry:
    """Append an entry (or return the one already written under this idempotency key)."""
    existing = await _by_key(engine, idempotency_key)
    if existing is not None:
        return existing
    details = details or {}
    at = datetime.now(UTC)
    try:
        async with engine.begin() as conn:
            # Updating the head row first takes the write lock, so appends are serialised.
            await conn.execute(
                update(ledger_head).where(ledger_head.c.id == 1).values(seq=ledger_head.c.seq + 1)
            )
            head = (await conn.execute(select(ledger_head).where(ledger_head.c.id == 1))).one()
            seq, prev_hash = head.seq, head.hash
            digest = entry_hash(
                seq, at, request_id, subject_ref, actor, action, system, details, prev_hash
            )
            entry = LedgerEntry(
                seq=seq,
                at=at,
                request_id=request_id,
                subject_ref=subject_ref,
                actor=actor,
                action=action,
                system=system,
                details=details,
                prev_hash=prev_hash,
                hash=digest,
            )
            await conn.execute(
                insert(ledger).values(**entry.model_dump(), idempotency_key=idempotency_key)
            )
            await conn.execute(update(ledger_head).where(ledger_head.c.id == 1).values(hash=digest))
    except IntegrityError:
        # A concurrent append with the same key won the race: its entry is the one.
        raced = await _by_key(engine, idempotency_key)
        if raced is None:
            raise
        return raced
    return entry


def _entry(row: object) -> LedgerEntry:
    fields = dict(row._mapping)  # type: ignore[attr-defined]
    fields.pop("idempotency_key")
    if fields["at"].tzinfo is None:  # SQLite keeps no time zone; Lethe writes UTC
        fields["at"] = fields["at"].replace(tzinfo=UTC)
    return LedgerEntry.model_validate(fields)


async def _by_key(engine: AsyncEngine, idempotency_key: str) -> LedgerEntry | None:
    async with engine.connect() as conn:
        row = (
            await conn.execute(select(ledger).where(ledger.c.idempotency_key == idempotency_key))
        ).first()
    return _entry(row) if row is not None else None


async def entries(engine: AsyncEngine, request_id: str | None = None) -> list[LedgerEntry]:
    """Entries in chain order, all of them or one request's."""
    query = select(ledger).order_by(ledger.c.seq)
    if request_id is not None:
        query = query.where(ledger.c.request_id == request_id)
    async with engine.connect() as conn:
        return [_entry(row) for row in await conn.execute(query)]


@dataclass(frozen=True)
class ChainReport:
    """The result of checking the whole chain."""

    entries: int
    problems: list[str]

    @property
    def intact(self) -> bool:
        """True when no entry was altered, removed or reordered."""
        return not self.problems


async def verify_chain(engine: AsyncEngine) -> ChainReport:
    """Recompute every hash and link; report each break with the entry's sequence number."""
    chain = await entries(engine)
    problems: list[str] = []
    prev_hash, expected_seq = GENESIS_HASH, 1
    for entry in chain:
        if entry.seq != expected_seq:
            problems.append(f"entry {expected_seq} is missing (next is {entry.seq})")
        if entry.prev_hash != prev_hash:
            problems.append(f"entry {entry.seq} does not link to the entry before it")
        recomputed = entry_hash(
            entry.seq,
            entry.at,
            entry.request_id,
            entry.subject_ref,
            entry.actor,
            entry.action,
            entry.system,
            entry.details,
            entry.prev_hash,
        )
        if recomputed != entry.hash:
            problems.append(f"entry {entry.seq} was altered (its hash does not match)")
        prev_hash, expected_seq = entry.hash, entry.seq + 1
    async with engine.connect() as conn:
        head = (await conn.execute(select(ledger_head).where(ledger_head.c.id == 1))).first()
    if head is not None and (head.seq != expected_seq - 1 or head.hash != prev_hash):
        problems.append(f"the chain ends at entry {expected_seq - 1}, but the head says {head.seq}")
    return ChainReport(entries=len(chain), problems=problems)
