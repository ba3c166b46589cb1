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
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Self

from sqlalchemy import Connection, func, inspect, select
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
from lethe.contracts import Evidence, StepOutcome, StepRequest
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
    checks = (
        "the key store answers to these credentials; its tables and columns; the user's "
        "privileges (PostgreSQL); this worker's subject key makes the request's reference"
    )
    proves = (
        "no data key of the subject is left, the shredding is recorded, and a canary written "
        "under the subject's key fails to decrypt with KeyShredded"
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
        """Write a canary (if the subject has a key), then destroy every data-key version."""
        step = request.step
        self.locator(request)
        journal = Journal.resume(request)
        try:
            async with _key_store(step.system):
                keys = await self._service()
                ref = _checked_ref(keys, request)
                prior = await _shredding(keys.engine, ref)
                canary, note = await _canary(keys, request, ref, prior)
                if canary is not None:
                    journal.progress["canary"] = canary  # in every heartbeat from now on
                await journal.plan(versions=await _count_keys(keys.engine, ref))
                destroyed = await keys.shred(ref, request.subject.tenant, request.request_id)
                record = await _shredding(keys.engine, ref)
        except LetheError:
            journal.failed()
            raise
        journal.erased(versions_destroyed=destroyed)
        if record is None:  # written and committed a moment ago: only a restore running now
            raise ServiceUnavailable(
                f"key store of system {step.system!r} lost the record of the shredding just "
                "written (is it being restored?); shredding again"
            )
        evidence: Evidence = {
            "versions_destroyed": journal.total("versions_destroyed", "versions"),
            "shredded_at": record.shredded_at.isoformat(),
            "shredding_request": record.request_id,
            "shredding_versions_destroyed": record.versions_destroyed,
            "canary": canary,
            **journal.evidence(),
        }
        affected = journal.affected()
        if prior is None or prior.request_id == request.request_id:
            # The key store decides: no earlier shredding (so no earlier attempt destroyed a
            # key), or the first shredding was this request's and its record says how many.
            earlier = prior.versions_destroyed if prior is not None else 0
            affected = earlier + destroyed
            evidence["versions_destroyed"] = affected
            if prior is not None or journal.earlier is not None:
                evidence.update(
                    first_attempt_evidence="key store",
                    earlier_versions_destroyed=earlier,
                    retry_versions_destroyed=destroyed,
                )
        return StepOutcome(
            step_id=step.id,
            status="running",
            affected=affected,
            evidence=evidence,
            detail=f"destroyed {destroyed} data-key version(s); canary {note}"
            + _earlier_detail(evidence, prior is not None),
        )

    async def verify(self, request: StepRequest, erased: StepOutcome) -> StepOutcome:
        """With a fresh key service: no data key left, the shredding recorded, the canary
        unreadable (`KeyShredded`); `done` or `failed`."""
        step = request.step
        self.locator(request)
        if erased.status in ("retained", "failed"):
            return erased
        async with _key_store(step.system):
            keys = await self._service()  # nothing cached: what the key store says now
            ref = _checked_ref(keys, request)
            remaining = await _count_keys(keys.engine, ref)
            record = await _shredding(keys.engine, ref)
            canary = erased.evidence.get("canary")
            outcome = None
            if isinstance(canary, str):
                outcome = await _try_canary(keys, canary, request.request_id)
        evidence: Evidence = {
            **erased.evidence,
            "data_keys_remaining": remaining,
            "shredding_recorded": record is not None,
            "canary_decryption": outcome,
        }
        problems = []
        if remaining:
            problems.append(
                f"{remaining} data-key version(s) of the subject are still in the key store "
                "(made after the shredding, or restored)"
            )
        if record is None:
            problems.append(
                "the key store has no record of the shredding, so it would make the subject "
                "new keys"
            )
        if outcome is not None and outcome != KeyShredded.__name__:
            problems.append(
                "the canary still decrypts"
                if outcome == "decrypted"
                else f"the canary failed with {outcome}, not as a shredded key does"
            )
        proof = (
            "the canary fails to decrypt (KeyShredded)"
            if outcome is not None
            else "no canary to try"
        )
        return verdict(erased, evidence, problems, f"no data key left; {proof}")

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


def _checked_ref(keys: KeyService, request: StepRequest) -> str:
    """The subject reference, refused unless this worker's subject key makes the same one:
    otherwise the shredding would hit another (or no) subject's keys."""
    ref = request.subject_ref
    if not _REF.fullmatch(ref):
        raise UnsupportedStep(f"step {request.step.id}: the subject reference is malformed")
    if keys.subject_ref(request.subject.tenant, request.subject.subject_id) != ref:
        raise ConfigurationError(f"{_FOREIGN_REF}; nothing was shredded")
    return ref


_FOREIGN_REF = (
    "this worker's LETHE_SUBJECT_KEY is not the one the request's subject reference was made "
    "with, so the key store names the subject differently"
)


def _ref_problem(subject_key: bytes, request: StepRequest) -> str | None:
    """What `_checked_ref` would refuse, in words; None when the reference is this worker's."""
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
    keys: KeyService, request: StepRequest, ref: str, prior: Shredding | None
) -> tuple[str | None, str]:
    """The canary (base64) and how it came about; erase heartbeats it before any key is
    destroyed. `prior` is the key store's record of an earlier shredding, if there is one."""
    earlier = _earlier_canary(ref)
    if earlier is not None:
        return earlier, "kept from an earlier attempt"
    if prior is not None and prior.request_id == request.request_id:
        return None, (
            "lost: an earlier attempt of this request shredded the keys, and the heartbeat "
            "that carried its canary did not arrive"
        )
    if prior is not None or await key_store.shredding_of(keys.engine, ref) is not None:
        return None, "not written: the subject's keys were shredded before"
    if await key_store.latest_key(keys.engine, ref) is None:
        return None, "not written: the subject has no data key"
    try:
        sealed = await keys.encrypt(
            request.subject, os.urandom(CANARY_BYTES), canary_place(request.request_id)
        )
    except KeyServiceError as exc:
        # The canary is the proof, not the erasure: a key that cannot encrypt is shredded anyway.
        return None, f"not written: {type(exc).__name__}"
    canary = base64.b64encode(sealed).decode()
    return canary, f"written under data-key version {ciphertext.parse(sealed)[0].dek_version}"


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


def _earlier_canary(ref: str) -> str | None:
    """The canary an earlier attempt of this activity heartbeated, if it is this subject's."""
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
        if header.subject_ref == ref:
            return canary
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


async def _count_keys(engine: AsyncEngine, ref: str) -> int:
    query = (
        select(func.count())
        .select_from(key_store.data_keys)
        .where(key_store.data_keys.c.subject_ref == ref)
    )
    async with engine.connect() as conn:
        return int((await conn.execute(query)).scalar_one())


async def _shredding(engine: AsyncEngine, ref: str) -> Shredding | None:
    table = key_store.shredded
    query = select(table.c.shredded_at, table.c.request_id, table.c.versions_destroyed).where(
        table.c.subject_ref == ref
    )
    async with engine.connect() as conn:
        row = (await conn.execute(query)).first()
    if row is None:
        return None
    return Shredding(row.shredded_at, row.request_id, row.versions_destroyed)


def _key_store(system: str) -> translated:
    """Driver errors as Lethe's, naming the system (never the driver's text)."""
    return translated(f"key store of system {system!r}", KeyStoreRefused)
