"""The key-service connector: crypto-shreds a subject's data keys, and proves it with a canary.

Services encrypt personal fields under per-subject data keys (`lethe.keys.service`) before
writing them where Lethe cannot edit (Kafka events, backups, documents). A `keys` system in the
data map is that key store; its step destroys every data-key version of the subject, and every
copy of what was encrypted under them becomes unreadable at once.

Erase writes a canary first: random bytes encrypted under the subject's current key (only when
the subject has one: no key is made just to destroy it), then shreds. The canary is ciphertext
under a key that no longer exists, not personal data, so the certificate and the ledger carry
it: anyone with the key store can try to decrypt it and watch it fail. Verify does that with a
fresh key service (nothing cached) and expects `KeyShredded`, and checks that the key store
holds no data key of the subject and does hold the record of the shredding.

Idempotent: shredding again destroys what is left (nothing, or what a restored key-store backup
brought back) and keeps the first shredding's record. The canary and the number of key versions
about to be destroyed are sent as heartbeat details before the keys are destroyed, and erase
waits until the server holds them (`lethe.activities.attempts`), so a retry of the activity (an
error, a lost worker) finds the canary and does not need the destroyed key to make another. A retry
that finds none (the heartbeat did not arrive) goes on without a canary: verification then rests
on the key store's state, and the detail says the canary was lost. What a retry reports as
destroyed comes from the key store's record when the first shredding was this request's (the
record is written in the transaction that destroys the keys, so it survives any crash); else
(a replay shredding keys a restore brought back) from the heartbeats, or None when they did not
arrive.

A forget-list replay after the key store is restored from a backup runs this same step: the
restored keys of every erased subject are destroyed again.

A batch of subjects (bulk erasure, `erase_batch`) runs the same code as one subject (`erase`, a
batch of one): the key store's records and key counts read in one query each, ONE canary, the
plan heartbeated, then every subject's data keys deleted and every shredding recorded in ONE
transaction (each subject locked as `lethe.keys.store` locks one), and verified in two queries
and one decryption. The batch's canary is written under the first subject with a data key and
no earlier shredding, and stands for the batch because one transaction destroyed every key of
the batch: its KeyShredded proves that transaction committed and that the key service refuses
what it shredded; each subject's own proof is that no data key of it is left and its shredding
is recorded. A subject whose reference is not this worker's fails alone. Per-subject counts come
from the key store's records (durable: written in the transaction), or, for a replay of an
earlier erasure's subjects, from per-subject counts in the batch's heartbeats.

Preflight, before anything is destroyed, reads only: on a connection of its own (the shared
engine would make missing tables), it checks that the key store answers, holds the tables the
step uses, lets the user do there what the step does (PostgreSQL says), and that this worker's
subject key makes the request's subject reference.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

from sqlalchemy import Connection, delete, func, insert, inspect, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool
from temporalio import activity

from lethe.activities.attempts import Journal
from lethe.activities.clients import Clients
from lethe.activities.common import verdict
from lethe.activities.connector import Connector, UnsupportedStep
from lethe.activities.driver_errors import translated
from lethe.classification.datamap import KeysLocator
from lethe.contracts import (
    BatchStepOutcome,
    BatchStepRequest,
    Evidence,
    Step,
    StepOutcome,
    StepRequest,
    Subject,
    SubjectOutcome,
)
from lethe.kernel.config import current_settings
from lethe.kernel.errors import (
    ConfigurationError,
    KeyServiceError,
    KeyShredded,
    LetheError,
    ServiceUnavailable,
)
from lethe.kernel.subjects import subject_ref
from lethe.keys import ciphertext
from lethe.keys import store as key_store
from lethe.keys.kek import LocalKekProvider
from lethe.keys.service import KeyService, place

CANARY_BYTES = 32
PREFLIGHT_TIMEOUT_SECONDS = 5
"""How long a preflight waits for the key store, connecting and asking together."""
_REF = re.compile(r"^[0-9a-f]{32}$")
_NEEDED: dict[str, tuple[str, ...]] = {
    key_store.data_keys.name: ("SELECT", "DELETE", "UPDATE"),  # UPDATE: the canary's budget
    key_store.shredded.name: ("SELECT", "INSERT"),
    key_store.kek_versions.name: ("SELECT",),
    key_store.kek_state.name: ("SELECT",),
}
"""The key store's tables the step uses, and what it does in each (PostgreSQL's names)."""
_FUNCTIONS = ("pg_advisory_xact_lock(bigint)", "hashtextextended(text, bigint)")
"""What the step calls to lock the subject while it shreds (PostgreSQL)."""
_MISSING_DATABASE = re.compile(r'database ".*" does not exist')
_REFUSED_LOGIN = re.compile(
    r'password authentication failed|role ".*" does not exist|no pg_hba\.conf entry'
)


class KeyStoreRefused(LetheError):
    """The key store refused a statement (a constraint, a permission)."""


def canary_place(request_id: str) -> bytes:
    """The associated data of an erasure's canary: bound to the request that wrote it."""
    return place("lethe", "shred-canary", request_id)


@dataclass(frozen=True)
class Shredding:
    """The key store's record of a subject's (first) shredding."""

    shredded_at: datetime
    request_id: str
    versions_destroyed: int


class KeyShredder(Connector[KeysLocator]):
    """Destroys every version of the subject's data keys in a key store (crypto-shredding)."""

    kind = "keys"
    locator_model = KeysLocator
    actions = ("shred",)
    batching = "every subject's data keys destroyed in one transaction; one canary for the batch"
    checks = (
        "the key store answers to these credentials; its tables and columns; the user's "
        "privileges (PostgreSQL); this worker's subject key makes the request's reference"
    )
    proves = (
        "no data key of the subject is left, the shredding is recorded, and a canary written "
        "under a shredded subject's key (one per batch) fails to decrypt with KeyShredded"
    )
    retries = "the key store's record of the first shredding, and the canary heartbeated"

    def __init__(self, url: str, master_key: bytes, subject_key: bytes) -> None:
        """Use the key store at `url`; the master key opens KEKs (for the canary), the subject
        key checks that the request's subject reference is the key store's."""
        self._url = url
        self._master_key = master_key
        self._subject_key = subject_key

    @classmethod
    def open(cls, clients: Clients, connection: str) -> Self:
        """The shredder for a key store URL, with the worker's master and subject keys (the
        key store is one of Lethe's own databases: `lethe.keys.store` holds its engine)."""
        settings = current_settings()
        return cls(connection, settings.keys_master_key_bytes, settings.subject_key_bytes)

    async def erase(self, request: StepRequest) -> StepOutcome:
        """Write a canary (if the subject has a key), then destroy every data-key version: the
        batch code (`erase_batch`) with a batch of one; the subject's problem is raised."""
        self.locator(request)
        journal = Journal.resume(request)
        item = _Item(request.subject_ref, request.subject)
        done = await self._shred(request.step, [item], request.request_id, journal)
        problem = done.problems[0]
        if problem is not None:
            journal.failed()
            raise problem
        return _erased(request, done, journal)

    async def verify(self, request: StepRequest, erased: StepOutcome) -> StepOutcome:
        """With a fresh key service: no data key left, the shredding recorded, the canary
        unreadable (`KeyShredded`); `done` or `failed`."""
        self.locator(request)
        if erased.status in ("retained", "failed"):
            return erased
        ref = request.subject_ref
        canary = erased.evidence.get("canary")
        checked = await self._check(
            request.step, [_Item(ref, request.subject)], canary, request.request_id
        )
        problem = checked.problems[0]
        if problem is not None:
            raise problem
        remaining, record = checked.remaining.get(ref, 0), checked.record.get(ref)
        evidence: Evidence = {
            **erased.evidence,
            "data_keys_remaining": remaining,
            "shredding_recorded": record is not None,
            "canary_decryption": checked.canary,
        }
        problems = _problems(remaining, record, checked.canary)
        return verdict(erased, evidence, problems, f"no data key left; {_proof(checked.canary)}")

    async def erase_batch(self, batch: BatchStepRequest) -> BatchStepOutcome:
        """Shred a batch of subjects: one canary (under the first subject with a key), the
        plan heartbeated, every subject's data keys destroyed and its shredding recorded in ONE
        transaction; then verified in a few queries. A subject whose reference is not this
        worker's fails alone."""
        self.locator(batch)
        items = [_Item(s.subject_ref, s.subject) for s in batch.subjects]
        journal = Journal.resume(batch)
        done = await self._shred(batch.step, items, batch.request_id, journal)
        checked = await self._check(batch.step, items, done.canary, batch.request_id)
        outcomes = [
            _subject_outcome(item, i, done, checked, batch.request_id, journal)
            for i, item in enumerate(items)
        ]
        live = [i for i, problem in enumerate(done.problems) if problem is None]
        decided = all(_by_key_store(done, items[i].ref, batch.request_id) for i in live)
        evidence: Evidence = {
            "subjects": len(items),
            "subjects_failed": sum(o.status == "failed" for o in outcomes),
            "versions_destroyed": (
                sum(outcomes[i].affected for i in live)
                if decided
                else journal.total("versions_destroyed", "versions")
            ),
            "shredded_subjects": len(checked.record),
            "data_keys_remaining": sum(checked.remaining.values()),
            "canary": done.canary,
            "canary_subject": done.canary_ref,
            "canary_decryption": checked.canary,
            **journal.evidence(),
        }
        finished = sum(o.status == "done" for o in outcomes)
        return BatchStepOutcome(
            step_id=batch.step.id,
            outcomes=outcomes,
            evidence=evidence,
            detail=f"{finished} of {len(items)} subject(s) done; destroyed "
            f"{sum(done.destroyed.values())} data-key version(s) in one transaction; canary "
            f"{done.note}; {_proof(checked.canary)}",
        )

    async def verify_batch(
        self, batch: BatchStepRequest, erased: BatchStepOutcome
    ) -> BatchStepOutcome:
        """Check again, in a few queries: each subject has no data key and a shredding record;
        the batch's canary still fails with KeyShredded."""
        self.locator(batch)
        items = [_Item(s.subject_ref, s.subject) for s in batch.subjects]
        canary = erased.evidence.get("canary")
        checked = await self._check(batch.step, items, canary, batch.request_id)
        canary_ref = erased.evidence.get("canary_subject")
        affected = {o.subject_ref: o.affected for o in erased.outcomes}
        outcomes = []
        for i, item in enumerate(items):
            problem = checked.problems[i]
            found = (
                [f"{type(problem).__name__}: {problem}"]
                if problem is not None
                else _problems(
                    checked.remaining.get(item.ref, 0),
                    checked.record.get(item.ref),
                    checked.canary if item.ref == canary_ref else None,
                )
            )
            outcomes.append(
                SubjectOutcome(
                    subject_ref=item.ref,
                    status="failed" if found else "done",
                    affected=affected.get(item.ref, 0),
                    detail="; ".join(found) or "no data key left; the shredding is recorded",
                )
            )
        return BatchStepOutcome(
            step_id=batch.step.id,
            outcomes=outcomes,
            evidence={
                **erased.evidence,
                "shredded_subjects": len(checked.record),
                "data_keys_remaining": sum(checked.remaining.values()),
                "canary_decryption": checked.canary,
            },
            detail=f"{sum(o.status == 'done' for o in outcomes)} of {len(items)} subject(s) "
            f"hold no data key; {_proof(checked.canary)}",
        )

    async def _shred(
        self, step: Step, items: list[_Item], request_id: str, journal: Journal
    ) -> _Shredded:
        """The effect for every subject whose reference is this worker's: the canary, the
        plan heartbeated (and confirmed), every data key destroyed and recorded, in one
        transaction; what the key store said before and after."""
        done = _Shredded([_ref_error(self._subject_key, step.id, item) for item in items])
        subjects = {i.ref: i for i, p in zip(items, done.problems, strict=True) if p is None}
        live = list(subjects)
        if not live:
            return done
        done.earlier = _EarlierVersions.of(journal, len(items))
        try:
            async with _key_store(step.system):
                keys = await self._service()
                done.prior = await _shreddings(keys.engine, live)
                versions = await _key_counts(keys.engine, live)
                await _canary(keys, [subjects[ref] for ref in live], request_id, done, versions)
                if done.canary is not None:
                    journal.progress["canary"] = done.canary  # in every heartbeat from now on
                    versions = await _key_counts(keys.engine, live)  # the canary may add one
                journal.progress[_PER_SUBJECT] = {
                    "made": done.earlier.made,
                    "planned": [versions.get(item.ref, 0) for item in items],
                }
                await journal.plan(versions=sum(versions.values()))
                done.destroyed = await _destroy(keys, [subjects[ref] for ref in live], request_id)
                done.record = await _shreddings(keys.engine, live)
        except LetheError:
            journal.failed()
            raise
        journal.progress[_PER_SUBJECT] = {
            "made": [
                made + (done.destroyed.get(item.ref, 0) if problem is None else 0)
                for made, item, problem in zip(done.earlier.made, items, done.problems, strict=True)
            ],
            "planned": [],
        }
        journal.erased(versions_destroyed=sum(done.destroyed.values()))
        if any(ref not in done.record for ref in live):
            # Written and committed a moment ago: only a restore running now.
            raise ServiceUnavailable(
                f"key store of system {step.system!r} lost the record of the shredding just "
                "written (is it being restored?); shredding again"
            )
        return done

    async def _check(
        self, step: Step, items: list[_Item], canary: object, request_id: str
    ) -> _Checked:
        """With a fresh key service (nothing cached): each subject's data keys left and its
        shredding record (two queries for the batch), and what decrypting the canary does."""
        checked = _Checked([_ref_error(self._subject_key, step.id, item) for item in items])
        live = list({i.ref: i for i, p in zip(items, checked.problems, strict=True) if p is None})
        if not live:
            return checked
        async with _key_store(step.system):
            keys = await self._service()
            checked.remaining = await _key_counts(keys.engine, live)
            checked.record = await _shreddings(keys.engine, live)
            if isinstance(canary, str):
                checked.canary = await _try_canary(keys, canary, request_id)
        return checked

    async def preflight(self, request: StepRequest) -> list[str]:
        """Touching nothing (no table is made, no key read): the key store answers to these
        credentials, holds the tables the step uses with their columns and, on PostgreSQL,
        lets this user do there what the step does; and this worker's LETHE_SUBJECT_KEY makes
        the request's subject reference."""
        step = request.step
        self.locator(request)
        where = f"key store of system {step.system!r}"
        problems = []
        wrong_ref = _ref_problem(self._subject_key, request)
        if wrong_ref is not None:
            problems.append(f"{where}: {wrong_ref}")
        problems += await _store_problems(self._url, step.system)
        return problems

    async def _service(self) -> KeyService:
        """A key service with no cache on the key store's shared engine (one per URL)."""
        engine = await key_store.key_engine(self._url)
        provider = LocalKekProvider(engine, self._master_key, cache_seconds=0)
        return KeyService(engine, provider, self._subject_key, cache_seconds=0)


_FOREIGN_REF = (
    "this worker's LETHE_SUBJECT_KEY is not the one the request's subject reference was made "
    "with, so the key store names the subject differently"
)


def _ref_problem(subject_key: bytes, request: StepRequest) -> str | None:
    """What `_ref_error` would refuse, in words; None when the reference is this worker's."""
    ref = request.subject_ref
    if not _REF.fullmatch(ref):
        return "the subject reference is malformed"
    if subject_ref(request.subject.tenant, request.subject.subject_id, subject_key) != ref:
        return _FOREIGN_REF
    return None


async def _store_problems(url: str, system: str) -> list[str]:
    """The key store's problems, asked on a connection of its own (not the shared engine, whose
    first use makes the tables): missing database, refused login, tables, columns, rights.
    Raises ServiceUnavailable when it does not answer within PREFLIGHT_TIMEOUT_SECONDS."""
    where = f"key store of system {system!r}"
    try:
        parsed = make_url(url)
    except ArgumentError:
        return [f"{where}: its URL is not a database URL"]
    if parsed.get_backend_name() == "sqlite":
        name = parsed.database or ""
        in_file = name and name != ":memory:" and not name.startswith("file:")
        if in_file and not await asyncio.to_thread(Path(name).exists):
            # Connecting would create the file.
            return [f"{where}: its database file does not exist"]
    engine = create_async_engine(url, poolclass=NullPool, connect_args=_connect_args(parsed))
    try:
        async with _key_store(system):
            try:
                async with asyncio.timeout(PREFLIGHT_TIMEOUT_SECONDS):
                    async with engine.connect() as conn:
                        return await _schema_problems(conn, where)
            except DBAPIError as exc:
                refused = _login_refusal(exc, where)
                if refused is None:
                    raise
                return [refused]
    finally:
        await engine.dispose()


def _connect_args(url: URL) -> dict[str, object]:
    """A connect timeout the driver understands, so an unreachable host fails in seconds."""
    if url.get_backend_name() != "postgresql":
        return {}
    if url.get_driver_name() == "asyncpg":
        return {"timeout": PREFLIGHT_TIMEOUT_SECONDS}
    return {"connect_timeout": PREFLIGHT_TIMEOUT_SECONDS}


def _login_refusal(exc: DBAPIError, where: str) -> str | None:
    """A refused connection that waiting will not mend, in words (never the driver's text)."""
    said = str(exc.orig)
    if _MISSING_DATABASE.search(said):
        return f"{where}: the database its URL names does not exist"
    if _REFUSED_LOGIN.search(said):
        return f"{where}: the server refused the credentials"
    return None


async def _schema_problems(conn: AsyncConnection, where: str) -> list[str]:
    columns = await conn.run_sync(_columns)
    problems = []
    for name in _NEEDED:
        table = key_store.key_tables.tables[name]
        found = columns.get(name)
        if found is None:
            problems.append(
                f"{where}: table {table.name} does not exist (no service has used this key "
                "store yet, or its URL names another database)"
            )
            continue
        lacking = [c.name for c in table.columns if c.name not in found]
        if lacking:
            problems.append(f"{where}: table {table.name} lacks column(s) {', '.join(lacking)}")
    if conn.dialect.name == "postgresql":
        problems += await _privilege_problems(conn, where, set(columns))
    return problems


def _columns(conn: Connection) -> dict[str, set[str]]:
    """The columns of each of the step's tables that exists."""
    inspector = inspect(conn)
    return {
        name: {column["name"] for column in inspector.get_columns(name)}
        for name in _NEEDED
        if inspector.has_table(name)
    }


async def _privilege_problems(conn: AsyncConnection, where: str, tables: set[str]) -> list[str]:
    asked = [
        (f"{privilege} on {table}", func.has_table_privilege(table, privilege))
        for table, privileges in _NEEDED.items()
        if table in tables
        for privilege in privileges
    ] + [
        (f"EXECUTE {function}", func.has_function_privilege(function, "EXECUTE"))
        for function in _FUNCTIONS
    ]
    answers = (await conn.execute(select(*(query for _, query in asked)))).one()
    denied = [what for (what, _), allowed in zip(asked, answers, strict=True) if not allowed]
    return [f"{where}: the database user may not {', '.join(denied)}"] if denied else []


async def _canary(
    keys: KeyService, items: list[_Item], request_id: str, done: _Shredded, versions: dict[str, int]
) -> None:
    """The canary (base64), the subject it is written for, and how it came about, into `done`;
    erase heartbeats it before any key is destroyed. One canary for a batch: under the first
    subject with a data key and no earlier shredding."""
    one = len(items) == 1
    earlier = _earlier_canary({item.ref for item in items})
    if earlier is not None:
        done.canary, done.canary_ref = earlier
        done.note = "kept from an earlier attempt"
        return
    if any(prior.request_id == request_id for prior in done.prior.values()):
        done.note = (
            "lost: an earlier attempt of this request shredded the keys, and the heartbeat "
            "that carried its canary did not arrive"
        )
        return
    fresh = [item for item in items if item.ref not in done.prior and versions.get(item.ref)]
    if not fresh:
        if done.prior:
            done.note = (
                "not written: the subject's keys were shredded before"
                if one
                else "not written: no subject of the batch has a data key not shredded before"
            )
        else:
            done.note = (
                "not written: the subject has no data key"
                if one
                else "not written: no subject of the batch has a data key"
            )
        return
    item = fresh[0]
    try:
        sealed = await keys.encrypt(
            item.subject, os.urandom(CANARY_BYTES), canary_place(request_id)
        )
    except KeyServiceError as exc:
        # The canary is the proof, not the erasure: a key that cannot encrypt is shredded anyway.
        done.note = f"not written: {type(exc).__name__}"
        return
    done.canary, done.canary_ref = base64.b64encode(sealed).decode(), item.ref
    version = ciphertext.parse(sealed)[0].dek_version
    done.note = f"written under data-key version {version}" + (
        "" if one else f" of subject {item.ref}, whose keys go in the batch's one transaction"
    )


def _earlier_detail(evidence: Evidence, first_was_earlier: bool) -> str:
    """What the detail adds about earlier attempts of a retried erase; `first_was_earlier`:
    the key store's first shredding was made before this attempt, by this request."""
    earlier = evidence.get("first_attempt_evidence")
    if earlier == "key store":
        if not evidence.get("earlier_versions_destroyed") and not first_was_earlier:
            return "; the key store holds no earlier shredding, so no earlier attempt made one"
        return (
            f"; the key store's record says this request's first shredding destroyed "
            f"{evidence.get('earlier_versions_destroyed')} version(s)"
        )
    if earlier == "planned":
        return (
            f"; an earlier attempt had found {evidence.get('earlier_found_versions')} "
            "version(s) and was about to destroy them when its worker was lost: how many it "
            "destroyed is not known"
        )
    if earlier == "lost":
        return (
            "; no heartbeat of an earlier attempt arrived, so what it destroyed, if anything, "
            "is not known"
        )
    return ""


def _earlier_canary(refs: set[str]) -> tuple[str, str] | None:
    """The canary an earlier attempt of this activity heartbeated, if it is one of these
    subjects', and its subject."""
    if not activity.in_activity():
        return None
    for details in activity.info().heartbeat_details:
        canary = details.get("canary") if isinstance(details, dict) else None
        if not isinstance(canary, str):
            continue
        try:
            header, _, _ = ciphertext.parse(base64.b64decode(canary, validate=True))
        except (binascii.Error, KeyServiceError):
            continue
        if header.subject_ref in refs:
            return canary, header.subject_ref
    return None


async def _try_canary(keys: KeyService, canary: str, request_id: str) -> str:
    """`decrypted`, or the name of the error decrypting the canary raised."""
    try:
        value = base64.b64decode(canary, validate=True)
        await keys.decrypt(value, canary_place(request_id), cached=False)
    except binascii.Error:
        return "MalformedCiphertext"
    except KeyServiceError as exc:
        return type(exc).__name__
    return "decrypted"


def _key_store(system: str) -> translated:
    """Driver errors as Lethe's, naming the system (never the driver's text)."""
    return translated(f"key store of system {system!r}", KeyStoreRefused)


_PER_SUBJECT = "per_subject"
"""The key of a batch's heartbeat progress with each subject's version counts, in order."""


@dataclass(frozen=True)
class _Item:
    """One subject of a batch: its reference, and the subject (for the canary)."""

    ref: str
    subject: Subject


@dataclass
class _EarlierVersions:
    """Each subject's versions that earlier attempts of a batch heartbeated: destroyed, and
    about to be destroyed when the last one's heartbeats stopped."""

    made: list[int]
    planned: list[int]

    @classmethod
    def of(cls, journal: Journal, size: int) -> _EarlierVersions:
        """From the journal's earlier progress, for a batch of `size` subjects."""
        told = journal.earlier_progress.get(_PER_SUBJECT)
        told = told if isinstance(told, Mapping) else {}
        planned = _counts(told.get("planned"), size) if journal.unconfirmed else [0] * size
        return cls(_counts(told.get("made"), size), planned)


def _counts(value: object, size: int) -> list[int]:
    """`size` counts from a heartbeat, or zeros when it holds none that fit."""
    if not isinstance(value, list) or len(value) != size:
        return [0] * size
    if all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value):
        return [int(n) for n in value]
    return [0] * size


@dataclass
class _Shredded:
    """What an attempt's shredding found and did, per subject reference."""

    problems: list[LetheError | None]
    """Per subject of the batch: why it was left out (its reference is not this worker's)."""
    prior: dict[str, Shredding] = field(default_factory=dict)
    """The key store's records of earlier shreddings, before this attempt."""
    record: dict[str, Shredding] = field(default_factory=dict)
    """The records after it."""
    destroyed: dict[str, int] = field(default_factory=dict)
    """Versions this attempt destroyed."""
    canary: str | None = None
    canary_ref: str | None = None
    note: str = ""
    """How the canary came about."""
    earlier: _EarlierVersions = field(default_factory=lambda: _EarlierVersions([], []))


@dataclass
class _Checked:
    """What the key store holds now, per subject reference, and what the canary does."""

    problems: list[LetheError | None]
    remaining: dict[str, int] = field(default_factory=dict)
    record: dict[str, Shredding] = field(default_factory=dict)
    canary: str | None = None
    """`decrypted` or the error's name; None when there is no canary to try."""


def _ref_error(subject_key: bytes, step_id: str, item: _Item) -> LetheError | None:
    """Why the subject's reference is refused (malformed, or not made by this worker's subject
    key, so the shredding would hit another or no subject's keys); None when it is fine."""
    if not _REF.fullmatch(item.ref):
        return UnsupportedStep(f"step {step_id}: the subject reference is malformed")
    if subject_ref(item.subject.tenant, item.subject.subject_id, subject_key) != item.ref:
        return ConfigurationError(f"{_FOREIGN_REF}; nothing was shredded")
    return None


def _by_key_store(done: _Shredded, ref: str, request_id: str) -> bool:
    """Whether the key store's record says what this request destroyed for `ref`: no earlier
    shredding (so no earlier attempt destroyed a key), or the first one was this request's."""
    prior = done.prior.get(ref)
    return prior is None or prior.request_id == request_id


def _affected(done: _Shredded, index: int, ref: str, request_id: str) -> int:
    """Versions the step destroyed for the subject at `index`: from the key store's record
    when it is this request's, else what the attempts heartbeated (at least)."""
    destroyed = done.destroyed.get(ref, 0)
    prior = done.prior.get(ref)
    if _by_key_store(done, ref, request_id):
        return (prior.versions_destroyed if prior is not None else 0) + destroyed
    return done.earlier.made[index] + max(destroyed, done.earlier.planned[index])


def _erased(request: StepRequest, done: _Shredded, journal: Journal) -> StepOutcome:
    """The one-subject outcome of erase, and its evidence."""
    ref = request.subject_ref
    destroyed, record, prior = done.destroyed[ref], done.record[ref], done.prior.get(ref)
    evidence: Evidence = {
        "versions_destroyed": journal.total("versions_destroyed", "versions"),
        "shredded_at": record.shredded_at.isoformat(),
        "shredding_request": record.request_id,
        "shredding_versions_destroyed": record.versions_destroyed,
        "canary": done.canary,
        **journal.evidence(),
    }
    affected = journal.affected()
    if _by_key_store(done, ref, request.request_id):
        affected = _affected(done, 0, ref, request.request_id)
        evidence["versions_destroyed"] = affected
        if prior is not None or journal.earlier is not None:
            evidence.update(
                first_attempt_evidence="key store",
                earlier_versions_destroyed=affected - destroyed,
                retry_versions_destroyed=destroyed,
            )
    return StepOutcome(
        step_id=request.step.id,
        status="running",
        affected=affected,
        evidence=evidence,
        detail=f"destroyed {destroyed} data-key version(s); canary {done.note}"
        + _earlier_detail(evidence, prior is not None),
    )


def _subject_outcome(
    item: _Item, index: int, done: _Shredded, checked: _Checked, request_id: str, journal: Journal
) -> SubjectOutcome:
    """One subject's verified outcome in a batch."""
    problem = done.problems[index]
    if problem is not None:
        return SubjectOutcome(
            subject_ref=item.ref, status="failed", detail=f"{type(problem).__name__}: {problem}"
        )
    problems = _problems(
        checked.remaining.get(item.ref, 0),
        checked.record.get(item.ref),
        checked.canary if item.ref == done.canary_ref else None,
    )
    detail = f"destroyed {done.destroyed.get(item.ref, 0)} data-key version(s)"
    prior = done.prior.get(item.ref)
    if prior is not None and prior.request_id == request_id:
        detail += (
            f"; the key store's record says this request's first shredding destroyed "
            f"{prior.versions_destroyed} version(s)"
        )
    elif journal.earlier == "lost":
        detail += "; no heartbeat of an earlier attempt arrived: what it destroyed is not known"
    elif done.earlier.planned[index]:
        detail += (
            f"; an earlier attempt had found {done.earlier.planned[index]} version(s) and was "
            "about to destroy them when its worker was lost"
        )
    return SubjectOutcome(
        subject_ref=item.ref,
        status="failed" if problems else "done",
        affected=_affected(done, index, item.ref, request_id),
        detail="; ".join([detail, *problems]) if problems else f"{detail}; no data key left",
    )


def _problems(remaining: int, record: Shredding | None, canary: str | None) -> list[str]:
    """What keeps a subject's shredding from being proven, in words."""
    problems = []
    if remaining:
        problems.append(
            f"{remaining} data-key version(s) of the subject are still in the key store "
            "(made after the shredding, or restored)"
        )
    if record is None:
        problems.append(
            "the key store has no record of the shredding, so it would make the subject new keys"
        )
    if canary is not None and canary != KeyShredded.__name__:
        problems.append(
            "the canary still decrypts"
            if canary == "decrypted"
            else f"the canary failed with {canary}, not as a shredded key does"
        )
    return problems


def _proof(canary: str | None) -> str:
    return "the canary fails to decrypt (KeyShredded)" if canary is not None else "no canary to try"


async def _destroy(keys: KeyService, items: list[_Item], request_id: str) -> dict[str, int]:
    """The effect: every subject's data keys destroyed and its shredding recorded, in one
    transaction. One subject goes through `KeyService.shred` (the key store's one-subject
    transaction, the same statements); a batch through `_shred_many`."""
    if len(items) == 1:
        item = items[0]
        return {item.ref: await keys.shred(item.ref, item.subject.tenant, request_id)}
    destroyed = await _shred_many(keys.engine, items, request_id)
    for item in items:
        keys.forget(item.ref)
    return destroyed


async def _shred_many(engine: AsyncEngine, items: list[_Item], request_id: str) -> dict[str, int]:
    """In ONE transaction, with every subject locked (in reference order, so two batches never
    wait on each other in a circle): delete every data-key version of every subject, and record
    the shredding of each subject not recorded before (an earlier record is kept: it is the
    first shredding). Versions destroyed per reference."""
    keys, marks = key_store.data_keys, key_store.shredded
    tenants = {item.ref: item.subject.tenant for item in items}
    refs = sorted(tenants)
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(_LOCK_ALL, {"refs": refs})
        gone = await conn.execute(
            delete(keys).where(keys.c.subject_ref.in_(refs)).returning(keys.c.subject_ref)
        )
        destroyed = Counter(gone.scalars())
        known = await conn.execute(select(marks.c.subject_ref).where(marks.c.subject_ref.in_(refs)))
        recorded = set(known.scalars())
        now = datetime.now(UTC)
        rows = [
            {
                "subject_ref": ref,
                "tenant": tenants[ref],
                "shredded_at": now,
                "request_id": request_id,
                "versions_destroyed": destroyed[ref],
            }
            for ref in refs
            if ref not in recorded
        ]
        if rows:
            await conn.execute(insert(marks), rows)
    return {ref: destroyed[ref] for ref in refs}


_LOCK_ALL = text(
    "SELECT count(pg_advisory_xact_lock(hashtextextended(ref, 0))) "
    "FROM (SELECT unnest(CAST(:refs AS text[])) AS ref ORDER BY ref) AS ordered"
)
"""The advisory lock `lethe.keys.store` takes for one subject, taken for every subject of a
batch in one statement (PostgreSQL)."""


async def _key_counts(engine: AsyncEngine, refs: list[str]) -> dict[str, int]:
    """Data-key versions per subject reference (absent: none), in one query."""
    table = key_store.data_keys
    query = (
        select(table.c.subject_ref, func.count())
        .where(table.c.subject_ref.in_(refs))
        .group_by(table.c.subject_ref)
    )
    async with engine.connect() as conn:
        return {ref: int(n) for ref, n in await conn.execute(query)}


async def _shreddings(engine: AsyncEngine, refs: list[str]) -> dict[str, Shredding]:
    """The key store's shredding records of these subject references, in one query."""
    table = key_store.shredded
    query = select(
        table.c.subject_ref, table.c.shredded_at, table.c.request_id, table.c.versions_destroyed
    ).where(table.c.subject_ref.in_(refs))
    async with engine.connect() as conn:
        rows = await conn.execute(query)
        return {
            row.subject_ref: Shredding(row.shredded_at, row.request_id, row.versions_destroyed)
            for row in rows
        }
