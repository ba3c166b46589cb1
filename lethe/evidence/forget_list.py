"""The forget-list: every erased subject, so a restore from backup can re-apply each erasure.

Re-applying an erasure to a restored database needs the subject's identifiers, which Lethe
otherwise never stores. They are kept here sealed (AES-GCM under a key derived from
LETHE_SUBJECT_KEY, bound to the subject reference), as the one record an erasure must keep to
stay effective (GDPR Art. 17(3)(b), Art. 5(2) accountability). Listing shows references only.
Reads keep to the current tenant scope.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import Select, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from lethe.contracts import Contract, Subject
from lethe.evidence.store import forget_list, owned, visible
from lethe.kernel.errors import LetheError
from lethe.keys import sealing


class SealBroken(LetheError):
    """A forget-list entry cannot be opened: wrong LETHE_SUBJECT_KEY, or the entry was altered."""


class ForgetListEntry(Contract):
    """One erased subject, as listings show it (reference only)."""

    subject_ref: str
    tenant: str
    request_id: str
    systems: list[str]
    erased_at: datetime


def _key(subject_key: bytes) -> AESGCM:
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"lethe forget-list")
    return AESGCM(derived.derive(subject_key))


def seal(subject: Subject, subject_ref: str, subject_key: bytes) -> str:
    """The subject, encrypted and bound to its reference."""
    sealed = sealing.seal(
        _key(subject_key), subject.model_dump_json().encode(), subject_ref.encode()
    )
    return base64.b64encode(sealed).decode()


def unseal(sealed: str, subject_ref: str, subject_key: bytes) -> Subject:
    """The subject back from its sealed form."""
    raw = base64.b64decode(sealed)
    try:
        plain = sealing.unseal(_key(subject_key), raw, subject_ref.encode())
    except InvalidTag:
        raise SealBroken(
            f"the forget-list entry of {subject_ref} cannot be opened: LETHE_SUBJECT_KEY differs "
            "from the one it was sealed with, or the entry was altered"
        ) from None
    return Subject.model_validate_json(plain)


async def add(
    engine: AsyncEngine,
    *,
    subject: Subject,
    subject_ref: str,
    request_id: str,
    systems: list[str],
    subject_key: bytes,
) -> None:
    """Put a subject on the forget-list (once; a later erasure of the same subject is a no-op)."""
    sealed = seal(subject, subject_ref, subject_key)
    await add_sealed(
        engine,
        [(subject_ref, sealed)],
        tenant=subject.tenant,
        request_id=request_id,
        systems=systems,
    )


async def add_sealed(
    engine: AsyncEngine,
    subjects: Sequence[tuple[str, str]],
    *,
    tenant: str,
    request_id: str,
    systems: list[str],
) -> None:
    """Put subjects already sealed (reference, sealed subject) on the forget-list, each once:
    those listed by an earlier erasure keep their entry."""
    now, tenant = datetime.now(UTC), str(owned(tenant, "a forget-list entry"))
    async with engine.begin() as conn:
        listed = await _listed_among(conn, [ref for ref, _ in subjects])
        rows = [
            {
                "subject_ref": ref,
                "tenant": tenant,
                "request_id": request_id,
                "systems": sorted(systems),
                "erased_at": now,
                "sealed_subject": sealed,
            }
            for ref, sealed in subjects
            if ref not in listed
        ]
        if rows:
            await conn.execute(insert(forget_list), rows)


def _in_scope(query: Select[Any]) -> Select[Any]:
    condition = visible(forget_list)
    return query if condition is None else query.where(condition)


async def listed(engine: AsyncEngine, subject_ref: str) -> bool:
    """Whether an earlier erasure put the subject on the forget-list."""
    return subject_ref in await listed_among(engine, [subject_ref])


async def listed_among(engine: AsyncEngine, refs: Sequence[str]) -> set[str]:
    """Which of `refs` an earlier erasure put on the forget-list."""
    async with engine.connect() as conn:
        return await _listed_among(conn, refs)


async def _listed_among(conn: AsyncConnection, refs: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(refs), 1000):
        chunk = list(refs[start : start + 1000])
        query = _in_scope(select(forget_list.c.subject_ref)).where(
            forget_list.c.subject_ref.in_(chunk)
        )
        found.update(row[0] for row in await conn.execute(query))
    return found


async def entries(engine: AsyncEngine) -> list[ForgetListEntry]:
    """Every entry, oldest first, without the sealed subject."""
    query = _in_scope(select(forget_list).order_by(forget_list.c.erased_at))
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [
        ForgetListEntry(
            subject_ref=row.subject_ref,
            tenant=row.tenant,
            request_id=row.request_id,
            systems=row.systems,
            erased_at=row.erased_at if row.erased_at.tzinfo else row.erased_at.replace(tzinfo=UTC),
        )
        for row in rows
    ]


async def subjects(engine: AsyncEngine, subject_key: bytes) -> list[tuple[str, Subject]]:
    """Every listed subject, unsealed, with its reference: for replay only."""
    query = _in_scope(
        select(forget_list.c.subject_ref, forget_list.c.sealed_subject).order_by(
            forget_list.c.erased_at
        )
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [
        (row.subject_ref, unseal(row.sealed_subject, row.subject_ref, subject_key)) for row in rows
    ]
