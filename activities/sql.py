"""The SQL connector: deletes, soft-deletes, pseudonymises or anonymises a subject's rows with
SQLAlchemy Core.

Works on PostgreSQL (`postgresql+psycopg://`) and SQLite (`sqlite+aiosqlite://`) through the
async engine, one engine per connection string. Before a step touches anything it reflects the
live tables and checks every table and column the data map names; identifiers are used only as
SQLAlchemy Table and Column objects and the subject id only as a bound parameter of the subject
column's type. Errors name systems, tables and columns, never the subject id or row contents.

The actions:

- `delete` removes the subject's rows.
- `soft_delete` marks them (the soft-delete column) and clears their personal columns.
- `pseudonymize` clears the personal columns and keeps each row's link to the subject (the
  subject column, the join keys): still personal data (GDPR Art. 4(5)), kept under the
  exception the plan's decisions name.
- `anonymize` clears the personal columns and breaks every link to the subject, so that no row
  leads back to them (Recital 26): the subject column on the table itself, or for a table found
  through `via` the join column of the first hop, becomes NULL or a random surrogate, a new one
  for each row (the data map's `unlink`). Where neither is possible (NOT NULL under a foreign
  key, a type with no surrogate) or the table has no primary key, the step fails before it
  changes anything, and its preflight says so.

Updates change only the rows not yet in the erased state, so running a step again changes
nothing that is already erased.

Verifying an anonymisation: unlinked rows can no longer be found by the subject, so the proof
has two parts. Inside erase's transaction, the subject's rows are read with their primary keys
(locked, FOR UPDATE), changed by those keys, and read back by them before the commit: every
one must be cleared and lead to the subject no more, or the transaction is rolled back. Verify,
then and on any later check, proves that no row of the table leads to the subject. The keys
themselves are kept nowhere (they would link the rows again); the evidence has the counts.

Evidence of the first effect: inside the transaction, before the statement that changes rows,
erase counts the subject's rows and those it will change and heartbeats the count, the attempt
and a digest of the rows' primary keys (never of the subject id; the digest stays in the
heartbeat, it is not evidence). A retry after a worker was lost between the commit and the
activity's completion finds nothing left to change; it then reports the count the earlier
attempt heartbeated (`rows_from_attempt`, `counted_by_attempt`) instead of 0, and passes that
count on unchanged. Heartbeats are sent asynchronously, so before committing erase asks
Temporal, for up to two seconds, whether it holds the count (`count_confirmed`); the commit goes
ahead either way, and when no count arrived the retry says so: `rows_from_attempt` is None and
the detail says the earlier count is not known.

Batches (bulk erasure): `erase_batch` erases one step for a batch of subjects in one
transaction, with one statement per table: the subjects' ids as one array parameter
(`subject = ANY(:ids)` on PostgreSQL, grouped by tenant when the table has a tenant column; an
expanding `IN` on SQLite). One read, before the change, finds (and locks) the batch's rows with
each row's subject, which gives each subject's count; verification is one grouped query that
says which subjects still have rows not erased. A subject whose id does not fit the subject
column is that subject's own `failed` outcome. The single-subject `erase` and `verify` are the
same code with a batch of one (`one_batch`); only what they heartbeat differs: the single step
its row count (above), a batch its journal (`Journal.resume(batch)`: the rows to change as the
plan, each subject's row count by reference in the record's progress, the rows changed after
the commit), so that a retry that finds a subject's rows erased reports the count an earlier
attempt heartbeated for it.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Literal, Protocol, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import (
    CHAR,
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    Date,
    DateTime,
    Enum,
    Float,
    FromClause,
    Integer,
    Interval,
    LargeBinary,
    Numeric,
    SmallInteger,
    String,
    Table,
    Text,
    Time,
    Uuid,
    and_,
    any_,
    bindparam,
    case,
    delete,
    false,
    func,
    literal,
    not_,
    or_,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.types import NullType
from temporalio import activity

from lethe.activities.attempts import Journal, heartbeat, last_heartbeat_held
from lethe.activities.clients import Clients
from lethe.activities.common import SchemaMismatch, retained_outcome, verdict
from lethe.activities.connector import Connector
from lethe.activities.driver_errors import SchemaChanged, translated, undefined_name
from lethe.activities.sql_schema import Reflected, SchemaCache, Tables
from lethe.classification.datamap import SqlTableLocator
from lethe.classification.taxonomy import matches
from lethe.contracts import (
    Action,
    BatchStepOutcome,
    BatchStepRequest,
    BulkSubject,
    Evidence,
    StepOutcome,
    StepRequest,
    SubjectOutcome,
    SweepBatch,
    SweepResult,
)
from lethe.kernel.errors import LetheError

TEXT_PLACEHOLDER = "erased"
EMAIL_PLACEHOLDER = "erased@erased.invalid"
DATE_PLACEHOLDER = date(1900, 1, 1)
DATETIME_PLACEHOLDER = datetime(1970, 1, 1)
"""Naive; given the UTC zone for columns that store one."""
SQL_ACTIONS: tuple[Action, ...] = ("delete", "soft_delete", "pseudonymize", "anonymize")
SURROGATE_PREFIX = "anon-"
"""Text surrogates start so, and say what they are; integer surrogates are negative."""
SURROGATE_DRAWS = 5
"""How many times surrogates that some row already holds are drawn again before giving up."""
KEY_CHUNK = 500
"""Primary keys per statement when rows are looked up by key."""
COUNT_CONFIRM_SECONDS = 2.0
"""How long erase waits, before committing, for Temporal to hold the count it heartbeated."""
_INTEGER = re.compile(r"-?[0-9]{1,20}")
_DECIMAL = re.compile(r"-?[0-9]{1,40}(\.[0-9]{1,40})?")
ROWS = "rows"
"""The key of a batch heartbeat's progress holding each subject's row count, by reference."""
T = TypeVar("T")
_Still = tuple[int, list[int]]
"""A subject's rows still matching, and how many fail each check."""


class SubjectIdDoesNotFit(LetheError):
    """The subject id cannot be compared with the subject column (text in an integer column)."""


class SoftDeleteNotPossible(LetheError):
    """A soft delete was asked for a table the data map gives no usable soft-delete column."""


class NoPlaceholder(LetheError):
    """A NOT NULL personal column has a type Lethe has no anonymous placeholder for."""


class UnlinkNotPossible(LetheError):
    """`anonymize` cannot break the rows' link to the subject: the link column is NOT NULL
    under a foreign key, or of a type with no random surrogate, or the table has no primary
    key. Pseudonymise (keeping the link) or delete instead."""


class ChangeRefused(LetheError):
    """The database refused a statement (a constraint, a type, a permission)."""


class RowsChanged(LetheError):
    """The subject's rows came or went between counting and erasing them (another writer);
    nothing was committed, and the step runs again."""

    retryable = True


@dataclass(frozen=True)
class _Unlink:
    """How `anonymize` breaks the rows' link to the subject: which column, and to what."""

    column: Column[Any]
    role: str
    """What the column is to the data map: the subject column, or the join column of hop 1."""
    draw: Callable[[], object] | None
    """None: NULL. Otherwise each call gives a new random surrogate of the column's type."""
    taken: tuple[Column[Any], ...] = ()
    """Columns whose values a surrogate must not equal: the link column itself and, through a
    join, the column it references (a surrogate that matched one would link someone)."""

    @property
    def to(self) -> str:
        """`null` or `surrogate`, as the evidence says it."""
        return "null" if self.draw is None else "surrogate"


@dataclass(frozen=True)
class _Target:
    """A step's table as the live database has it, with the batch's subjects' match and what to
    clear."""

    tables: list[Table]
    """Every table the step reads: the erased one, then those of its join path."""
    table: Table
    match: ColumnElement[bool]
    """True for the rows of the batch's subjects (those whose id fits the subject column): on
    the table itself or through the join path; for the statements that change rows."""
    source: FromClause
    """The erased table joined along the path up to the subject column: for the reads that
    tell each row's subject."""
    found_by: ColumnElement[bool]
    """`match` on `source`."""
    owner: list[ColumnElement[Any]]
    """On `source`, whose row it is: the subject column (and the tenant column)."""
    owners: dict[tuple[object, ...], list[int]]
    """The batch's subjects (their indexes) by the values `owner` has for their rows."""
    padded: tuple[bool, ...]
    """Which of `owner` are CHAR columns (whose values come back padded with blanks)."""
    unfit: dict[int, SubjectIdDoesNotFit]
    """The subjects (by index) whose id does not fit the subject column: matched by nothing."""
    soft_delete: Column[Any] | None
    kept: list[str]
    primary_key: list[Column[Any]] = field(default_factory=list)
    """The erased table's primary key columns (empty when it has none)."""
    clear: dict[str, object] = field(default_factory=dict)
    """Personal column -> the value it is cleared to: None (NULL) or a typed placeholder."""
    unlink: _Unlink | None = None
    """For `anonymize`: the link to break."""


@dataclass
class _Rows:
    """One subject's rows as erase's transaction found (and locked) them."""

    matched: int = 0
    """Rows of the subject: on the table itself or through the join path."""
    pending: int = 0
    """Of those, rows not yet in the erased state: what the step changes."""
    keys: dict[tuple[Any, ...], None] = field(default_factory=dict)
    """The matched rows' primary keys (empty when the table has none)."""


@dataclass(frozen=True)
class _Found:
    """The batch's rows as erase's transaction found (and locked) them, before changing any."""

    subjects: dict[int, _Rows] = field(default_factory=dict)
    """By the subject's index in the batch; a subject without rows is missing."""
    keys: list[tuple[Any, ...]] = field(default_factory=list)
    """The primary keys of the pending rows, each once (empty when the table has none)."""
    pending: int = 0
    """Rows the step changes, each counted once whichever subjects it belongs to."""

    def of(self, index: int) -> _Rows:
        """The rows of the batch's subject `index`."""
        return self.subjects.get(index) or _Rows()


@dataclass(frozen=True)
class _Erasure:
    """What erase's transaction did for a batch."""

    target: _Target
    dialect: str
    found: _Found
    changed: int
    """Rows changed, each counted once."""
    retained: str | None = None
    """Why nothing was done, when every personal column is kept."""


class _Ledger(Protocol):
    """How an erase tells a later attempt what it found and changed (heartbeats)."""

    async def plan(self, batch: BatchStepRequest, target: _Target, found: _Found) -> None:
        """Inside the transaction, before any row changes: what was found."""

    async def confirm(self, changed: int) -> None:
        """Just before the commit."""

    def erased(self, changed: int) -> None:
        """After the commit."""


class _Counted(BaseModel):
    """What a one-subject erase heartbeats inside its transaction, before it changes any row:
    how many of the subject's rows the step covers and changes, and which (a digest of their
    keys)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    kind: Literal["sql.rows"] = "sql.rows"
    step: str
    action: str
    attempt: int = Field(ge=1)
    rows: int = Field(ge=0)
    changed: int = Field(ge=0)
    digest: str | None = None


class SqlEraser(Connector[SqlTableLocator]):
    """Deletes, soft-deletes, pseudonymises or anonymises a subject's rows in one table."""

    kind = "sql"
    locator_model = SqlTableLocator
    actions = SQL_ACTIONS
    batching = (
        "one statement per table for the whole batch (subject = ANY(:ids) on PostgreSQL, IN on "
        "SQLite) in one transaction; one grouped query verifies it"
    )
    checks = (
        "the database answers; tables, columns and join path exist as mapped; the subject id "
        "fits its column; anonymize can unlink; the role's privileges (PostgreSQL)"
    )
    proves = (
        "no row matches the subject (delete, anonymize), or every matching row is marked and "
        "cleared (soft_delete, pseudonymize)"
    )
    retries = (
        "the row count heartbeated inside the transaction before the commit (a batch: each "
        "subject's count, by reference, in the batch's journal)"
    )
    sweeps = (
        "rows past the limit and every obligation, outside holds, deleted, soft-deleted or "
        "anonymised in keyset batches by (date, key), one transaction each"
    )

    def __init__(self, engine: AsyncEngine, schemas: SchemaCache | None = None) -> None:
        """Use `engine` and the descriptions of its tables in `schemas` (the worker's, from
        `open`; a cache of its own by default)."""
        self.engine = engine
        self.schemas = schemas or SchemaCache()
        self._erased: tuple[BatchStepRequest, _Target] | None = None
        """The batch erase has just done and its target, for the verify that follows."""

    @classmethod
    def open(cls, clients: Clients, connection: str) -> Self:
        """The eraser for a connection string, over the worker's engine and descriptions."""
        return cls(clients.sql_engine(connection), clients.sql_schemas(connection))

    async def erase(self, request: StepRequest) -> StepOutcome:
        """Delete, soft-delete, pseudonymise or anonymise the subject's rows in one
        transaction (a batch of one). A retry that finds the work done reports the earlier
        attempt's count."""
        return await self._on_current_schema(request, self._erase(request))

    async def verify(self, request: StepRequest, erased: StepOutcome) -> StepOutcome:
        """Check the erasure held: rows gone, unlinked, or marked and cleared; `done` or
        `failed`."""
        return await self._on_current_schema(request, self._verify(request, erased))

    async def erase_batch(self, batch: BatchStepRequest) -> BatchStepOutcome:
        """Erase a batch of subjects' rows in one transaction (one statement per table), then
        verify them (one query): an outcome per subject. A subject whose id does not fit the
        subject column fails alone; a retry reports what an earlier attempt changed."""
        journal = _Journaled(batch)
        try:
            done = await self._on_current_schema(batch, self._erase_rows(batch, journal))
        except LetheError:
            journal.journal.failed()
            raise
        return await self.verify_batch(batch, journal.outcome(batch, done))

    async def verify_batch(
        self, batch: BatchStepRequest, erased: BatchStepOutcome
    ) -> BatchStepOutcome:
        """Check the erasure held for every subject of the batch that erase did not fail or
        retain, in one query: `done` or `failed` each."""
        return await self._on_current_schema(batch, self._verify_batch(batch, erased))

    async def sweep(self, batch: SweepBatch) -> SweepResult:
        """One batch of a retention sweep over one table (`lethe.activities.sql_retention`)."""
        # Imported here: the sweep builds on this module's helpers.
        from lethe.activities.sql_retention import sweep_table

        return await sweep_table(self.engine, self.schemas, batch)

    async def _on_current_schema(
        self, request: StepRequest | BatchStepRequest, work: Awaitable[T]
    ) -> T:
        """Run `work`; when its statement met tables that changed since they were described,
        forget the description and read the tables again: what the data map names and the
        database lacks is a SchemaMismatch naming it, else the step runs again (retryable)."""
        try:
            return await work
        except SchemaChanged as exc:
            changed = exc
        # Outside the handler, so that the SchemaMismatch below stands alone.
        self.schemas.forget(table_names(self.locator(request)))
        batch = request if isinstance(request, BatchStepRequest) else one_batch(request)
        async with database_errors(request.step.system), self.engine.connect() as conn:
            await _target(conn, batch, self.schemas, fresh=True)
        raise changed

    async def _erase_rows(self, batch: BatchStepRequest, ledger: _Ledger) -> _Erasure:
        """Find (and lock) the batch's rows, tell `ledger`, change them with one statement and
        commit: one transaction for the batch."""
        step = batch.step
        locator = self.locator(batch)
        self._erased = None
        async with database_errors(step.system), self.engine.connect() as conn:
            target = await _target(conn, batch, self.schemas)
            dialect = conn.dialect.name
            if (
                step.action in ("pseudonymize", "anonymize")
                and not target.clear
                and target.unlink is None
            ):
                why = f"every personal column of {locator.table} is kept"
                return self._done(batch, _Erasure(target, dialect, _Found(), 0, retained=why))
            values = dict(target.clear)
            if step.action == "soft_delete":
                values.update(_soft_delete_value(batch, target))
            if not target.owners:
                # No subject's id fits.
                return self._done(batch, _Erasure(target, dialect, _Found(), 0))
            found = await _found(conn, batch, target)
            await ledger.plan(batch, target, found)
            changed = await _change(conn, batch, target, found, values)
            _check_changed(batch, found.pending, changed)
            await ledger.confirm(changed)
            await self._commit(conn)
        ledger.erased(changed)
        return self._done(batch, _Erasure(target, dialect, found, changed))

    def _done(self, batch: BatchStepRequest, done: _Erasure) -> _Erasure:
        """Keep the target erase used for the verify that follows in this call: its tables
        were checked against the database a moment ago (its statements would fail else)."""
        self._erased = (batch, done.target)
        return done

    def _just_erased(self, batch: BatchStepRequest) -> _Target | None:
        """The target erase used for `batch` just before, once; None for another batch."""
        erased, self._erased = self._erased, None
        if erased is None or (erased[0] is not batch and erased[0] != batch):
            return None
        return erased[1]

    async def _commit(self, conn: AsyncConnection) -> None:
        """Commit the step's transaction: once this returns, the effect is made (its own method,
        so tests/e2e/crash_after_effect.py can end a worker right after it)."""
        await conn.commit()

    async def _erase(self, request: StepRequest) -> StepOutcome:
        counts = _Counts(request)
        done = await self._erase_rows(one_batch(request), counts)
        if 0 in done.target.unfit:
            raise done.target.unfit[0]
        if done.retained is not None:
            return retained_outcome(request, done.retained)
        return counts.outcome(request, done)

    async def _checked(
        self, batch: BatchStepRequest, erased: _Target | None
    ) -> tuple[_Target, list[tuple[str, ColumnElement[bool]]], dict[int, _Still]]:
        """The step's target (`erased`: the one erase used a moment ago, else described now),
        the checks of an erased row, and for each subject with rows still matching: how many,
        and how many fail each check (one query for the batch)."""
        async with database_errors(batch.step.system), self.engine.connect() as conn:
            target = erased or await _target(conn, batch, self.schemas, unlink=False)
            # Anonymised rows cannot be found any more: none may lead to the subject.
            action = batch.step.action
            checks = [] if action == "anonymize" else _checks(action, target)
            still: dict[int, _Still] = {}
            if not target.owners:
                return target, checks, still
            query = (
                select(
                    *target.owner,
                    func.count(),
                    *(func.coalesce(func.sum(case((ok, 0), else_=1)), 0) for _, ok in checks),
                )
                .select_from(target.source)
                .where(target.found_by)
                .group_by(*target.owner)
            )
            width = len(target.owner)
            for row in (await conn.execute(query)).all():
                for index in target.owners.get(_owned(row[:width], target.padded), []):
                    matching, failing = still.get(index, (0, [0] * len(checks)))
                    counts = [int(n) for n in row[width + 1 :]]
                    still[index] = (
                        matching + int(row[width]),
                        [a + b for a, b in zip(failing, counts, strict=True)],
                    )
        return target, checks, still

    async def _verify(self, request: StepRequest, erased: StepOutcome) -> StepOutcome:
        batch = one_batch(request)
        described = self._just_erased(batch)
        if erased.status in ("retained", "failed"):
            return erased
        target, checks, still = await self._checked(batch, described)
        if 0 in target.unfit:
            raise target.unfit[0]
        matching, failing = still.get(0, (0, [0] * len(checks)))
        evidence, problems, done = _judged(
            request, checks, matching, failing, erased.evidence.get("rows_checked")
        )
        return verdict(erased, evidence, problems, done)

    async def _verify_batch(
        self, batch: BatchStepRequest, erased: BatchStepOutcome
    ) -> BatchStepOutcome:
        described = self._just_erased(batch)
        open_ = [i for i, o in enumerate(erased.outcomes) if o.status not in ("retained", "failed")]
        if not open_:
            return erased
        _, checks, still = await self._checked(batch, described)
        outcomes = list(erased.outcomes)
        matching_rows = 0
        for index in open_:
            matching, failing = still.get(index, (0, [0] * len(checks)))
            matching_rows += matching
            _, problems, _ = _judged(batch, checks, matching, failing, None)
            was = outcomes[index]
            outcomes[index] = was.model_copy(
                update={
                    "status": "failed" if problems else "done",
                    "detail": "; ".join([*([was.detail] if was.detail else []), *problems]),
                }
            )
        failed = sum(1 for index in open_ if outcomes[index].status == "failed")
        locator = self.locator(batch)
        evidence: Evidence = {
            **erased.evidence,
            "rows_matching": matching_rows,
            "subjects_verified": len(open_),
            "subjects_failed_verify": failed,
        }
        done = f"verified {batch.step.action} in {locator.table} for {len(open_)} subject(s)"
        if failed:
            done += f"; {failed} still have rows not erased"
        return erased.model_copy(
            update={
                "outcomes": outcomes,
                "evidence": evidence,
                "detail": "; ".join(d for d in (erased.detail, done) if d),
            }
        )

    async def preflight(self, request: StepRequest) -> list[str]:
        """Touching nothing: the database answers, the tables, columns and join path are as
        the data map says, the subject id fits, `anonymize` can unlink the rows, and
        (PostgreSQL) the role may do the step."""
        step = request.step
        locator = self.locator(request)  # a step it cannot do is refused, not a problem
        async with database_errors(step.system), self.engine.connect() as conn:
            try:
                # A problem met on a kept description is confirmed on the tables read afresh.
                target = await _target(conn, one_batch(request), self.schemas, confirm=True)
            except LetheError as exc:
                return [f"{type(exc).__name__}: {exc}"]
            if 0 in target.unfit:
                return [f"{SubjectIdDoesNotFit.__name__}: {target.unfit[0]}"]
            if conn.dialect.name != "postgresql":
                return []  # SQLite has no privileges to check
            return await _privileges_missing(conn, step.system, locator, step.action)


def one_batch(request: StepRequest) -> BatchStepRequest:
    """A one-subject request as a batch of one (the same request id and step): the single path
    runs the batch code."""
    return BatchStepRequest(
        request_id=request.request_id,
        batch=0,
        step=request.step,
        subjects=[BulkSubject(subject_ref=request.subject_ref, subject=request.subject)],
        erasure_started_at=request.erasure_started_at,
        window_ends_at=request.window_ends_at,
        found=None if request.subject_found else [],
    )


async def _privileges_missing(
    conn: AsyncConnection, system: str, locator: SqlTableLocator, action: str
) -> list[str]:
    """The privileges the step needs that the role lacks (PostgreSQL), all asked in one query."""
    needed = [
        (locator.table, "DELETE" if action == "delete" else "UPDATE"),
        *((name, "SELECT") for name in [locator.table, *(h.table for h in locator.via)]),
    ]
    held = (
        await conn.execute(
            select(*(func.has_table_privilege(literal(t), literal(p)) for t, p in needed))
        )
    ).one()
    return [
        f"system {system!r}: the database role may not {privilege} on table {table!r}"
        for (table, privilege), ok in zip(needed, held, strict=True)
        if not ok
    ]


def _judged(
    request: StepRequest | BatchStepRequest,
    checks: list[tuple[str, ColumnElement[bool]]],
    matching: int,
    failing: list[int],
    checked: object,
) -> tuple[Evidence, list[str], str]:
    """What verify found for one subject: its evidence, its problems, and what it says when
    there are none. `checked`: the rows erase read back before the commit (anonymize)."""
    step, locator = request.step, SqlEraser.locator(request)
    evidence: Evidence = {"table": locator.table, "action": step.action, "rows_matching": matching}
    if step.action == "delete":
        evidence["rows_remaining"] = matching
        if matching:
            return (
                evidence,
                [f"{matching} row(s) of {locator.table} still match the subject after delete"],
                "",
            )
    if step.action == "anonymize":
        evidence["rows_linked"] = matching
        if matching:
            problem = (
                f"{matching} row(s) of {locator.table} still lead to the subject after anonymize"
            )
            return evidence, [problem], ""
        done = f"verified anonymize in {locator.table}: no row leads to the subject any more"
        if isinstance(checked, int) and checked:
            done += (
                f"; the {checked} row(s) changed were read back by primary key, cleared and "
                "unlinked, before the commit"
            )
        return evidence, [], done
    for (name, _), count in zip(checks, failing, strict=True):
        evidence[f"rows_not_cleared.{name}"] = count
    problems = [
        f"{n} of the subject's row(s) in {locator.table} still have column "
        f"{name} {'unset' if name == locator.soft_delete_column else 'uncleared'}"
        for (name, _), n in zip(checks, failing, strict=True)
        if n
    ]
    return evidence, problems, f"verified {step.action} in {locator.table}"


# --- the step's target -----------------------------------------------------------------------


def database_errors(system: str) -> translated:
    """Driver errors as Lethe's, naming the system (never the driver's text)."""
    return translated(f"database of system {system!r}", ChangeRefused, schema_changes=True)


def table_names(locator: SqlTableLocator) -> list[str]:
    """The tables a step reads: the erased one, then those of its join path."""
    return list(dict.fromkeys([locator.table, *(hop.table for hop in locator.via)]))


def described_tables(system: str, names: Sequence[str], reflected: Tables) -> dict[str, Table]:
    """The tables `names` as `reflected` describes them, by name (the same `Table` objects for
    as long as the description is kept); SchemaMismatch naming one the database lacks."""
    tables: dict[str, Table] = {}
    for name in names:
        described = reflected[name]
        if described is None:
            raise SchemaMismatch(f"system {system!r} has no table {name!r}")
        tables[name] = described.table(name)
    return tables


def described_column(system: str, table: Table, name: str, role: str) -> Column[Any]:
    """`table`'s column `name`; SchemaMismatch naming it and its `role` when the table lacks it."""
    if name not in table.c:
        raise SchemaMismatch(
            f"system {system!r}: table {table.fullname!r} has no column {name!r} ({role})"
        )
    found: Column[Any] = table.c[name]
    return found


async def _target(
    conn: AsyncConnection,
    batch: BatchStepRequest,
    schemas: SchemaCache,
    *,
    unlink: bool = True,
    fresh: bool = False,
    confirm: bool = False,
) -> _Target:
    """Describe the step's tables (kept, or `fresh`), check the data map against them, and
    build the batch's subjects' match (and, for `anonymize` unless `unlink` is False, how to
    break the rows' link). With `confirm` (the preflight), any problem met on a kept
    description, an id that does not fit included, counts only once the tables read afresh
    show it too."""
    locator = SqlEraser.locator(batch)
    names = table_names(locator)
    reflected, kept = await schemas.tables(conn, names, locator.table, fresh=fresh)
    if kept:
        target = await _kept_target(conn, batch, reflected, unlink=unlink, confirm=confirm)
        if target is not None:
            return target
        reflected, _ = await schemas.tables(conn, names, locator.table, fresh=True)
    return _target_of(batch, reflected, conn.dialect.name, unlink=unlink)


async def _kept_target(
    conn: AsyncConnection,
    batch: BatchStepRequest,
    reflected: Tables,
    *,
    unlink: bool,
    confirm: bool,
) -> _Target | None:
    """The target on a kept description, or None when the tables must be read again: it may
    be stale, so any mismatch, or a described column the database no longer has (and with
    `confirm` any problem), is checked against the tables read afresh before it counts."""
    try:
        target = _target_of(batch, reflected, conn.dialect.name, unlink=unlink)
        if confirm and target.unfit:
            return None
        await _still_described(conn, target)
        return target
    except SchemaMismatch:
        return None
    except LetheError:
        if confirm:
            return None
        raise
    except DBAPIError as exc:
        if not undefined_name(exc):
            raise
        await conn.rollback()  # nothing was done yet: the failed probe only
        return None


async def _still_described(conn: AsyncConnection, target: _Target) -> None:
    """Select every described column of the step's tables, reading no row: fails (UndefinedColumn)
    when one was dropped since the tables were described."""
    for table in target.tables:
        await conn.execute(select(*table.c).limit(0))


def _target_of(
    batch: BatchStepRequest, reflected: Tables, dialect: str, *, unlink: bool
) -> _Target:
    """The step's target on tables as `reflected` describes them; SchemaMismatch naming what
    the data map names and they lack."""
    step, locator = batch.step, SqlEraser.locator(batch)
    tables = described_tables(step.system, table_names(locator), reflected)

    def column(table: str, name: str, role: str) -> Column[Any]:
        return described_column(step.system, tables[table], name, role)

    table = tables[locator.table]
    personal = {name: column(locator.table, name, "a personal column") for name in locator.columns}
    soft_delete = None
    if locator.soft_delete_column is not None:
        soft_delete = column(locator.table, locator.soft_delete_column, "the soft-delete column")

    # The tables of the path are aliased, so a path that comes back to a table it passed through
    # (or to the erased table itself) compares the right rows.
    hops: list[tuple[ColumnElement[Any], ColumnElement[Any]]] = []
    previous: FromClause = table
    source: FromClause = table
    previous_name = locator.table
    for index, hop in enumerate(locator.via, 1):
        column(previous_name, hop.column, f"the join column of hop {index}")
        column(hop.table, hop.references, f"the column hop {index} references")
        joined = tables[hop.table].alias(f"lethe_path_{index}")
        hops.append((previous.c[hop.column], joined.c[hop.references]))
        source = source.join(joined, previous.c[hop.column] == joined.c[hop.references])
        previous, previous_name = joined, hop.table
    subject = column(previous_name, locator.subject_column, "the subject column")
    owner: list[ColumnElement[Any]] = [previous.c[locator.subject_column]]
    if locator.tenant_column is not None:
        # The subject is (tenant, id): another tenant's subject with the same id stays.
        column(previous_name, locator.tenant_column, "the tenant column")
        owner.append(previous.c[locator.tenant_column])
    padded = tuple(isinstance(col.type, CHAR) for col in owner)
    owners, unfit = _owners(batch, subject, previous_name, dialect, padded=padded)
    found_by = _subjects_match(owner, subject, owners, dialect)
    match = found_by
    for outer, inner in reversed(hops):
        match = outer.in_(select(inner).where(match))

    kept = list(step.keep_columns)
    unknown = [name for name in kept if name not in locator.columns]
    if unknown:
        raise LetheError(
            f"step {step.id} keeps {', '.join(unknown)}, which the data map does not list as "
            f"personal columns of {locator.table}"
        )
    # What links a row to the subject: the subject column here, or the first hop's join column.
    link, role = (
        (locator.via[0].column, "the join column of hop 1")
        if locator.via
        else (locator.subject_column, "the subject column")
    )
    clear: dict[str, object] = {}
    if step.action in ("soft_delete", "pseudonymize", "anonymize"):
        for name, col in personal.items():
            if name in kept or name == locator.soft_delete_column:
                continue
            if step.action == "anonymize" and name == link:
                continue  # unlinked below, not cleared
            clear[name] = (
                None
                if col.nullable
                else placeholder(col, locator.columns[name], step.system, locator.table)
            )
    broken = None
    if step.action == "anonymize" and unlink and (clear or link in personal):
        if link in kept:
            raise UnlinkNotPossible(
                f"step {step.id} keeps column {link!r} of table {locator.table!r} ({role}), "
                "which anonymize must unlink; pseudonymize keeps it"
            )
        references = (
            tables[locator.via[0].table].c[locator.via[0].references] if locator.via else None
        )
        broken = _unlink_of(
            batch,
            table.c[link],
            role,
            described=reflected[locator.table],
            references=references,
            dialect=dialect,
        )
    return _Target(
        tables=list(tables.values()),
        table=table,
        match=match,
        source=source,
        found_by=found_by,
        owner=owner,
        owners=owners,
        padded=padded,
        unfit=unfit,
        soft_delete=soft_delete,
        kept=kept,
        primary_key=list(table.primary_key.columns),
        clear=clear,
        unlink=broken,
    )


def _owners(
    batch: BatchStepRequest,
    subject: Column[Any],
    table: str,
    dialect: str,
    *,
    padded: tuple[bool, ...],
) -> tuple[dict[tuple[object, ...], list[int]], dict[int, SubjectIdDoesNotFit]]:
    """The batch's subjects (indexes) by their subject column value (and tenant), and those
    whose id does not fit the column."""
    owners: dict[tuple[object, ...], list[int]] = {}
    unfit: dict[int, SubjectIdDoesNotFit] = {}
    tenant = len(padded) > 1
    for index, item in enumerate(batch.subjects):
        try:
            value = subject_value(item.subject.subject_id, subject, table, dialect)
        except SubjectIdDoesNotFit as exc:
            unfit[index] = exc
            continue
        key = _owned((value, item.subject.tenant) if tenant else (value,), padded)
        owners.setdefault(key, []).append(index)
    return owners, unfit


def _owned(values: Sequence[Any], padded: Sequence[bool]) -> tuple[object, ...]:
    """A row's subject (and tenant) as the key of `_Target.owners`: the text of a CHAR column
    without the trailing blanks it is padded with (its comparison ignores them too)."""
    return tuple(
        value.rstrip(" ") if pad and isinstance(value, str) else value
        for value, pad in zip(values, padded, strict=True)
    )


def _subjects_match(
    owner: list[ColumnElement[Any]],
    subject: Column[Any],
    owners: dict[tuple[object, ...], list[int]],
    dialect: str,
) -> ColumnElement[bool]:
    """True for the rows of `owners`: `subject = ANY(:ids)` on PostgreSQL, an expanding `IN`
    elsewhere; with a tenant column, one such test per tenant of the batch."""
    by_tenant: dict[object, list[object]] = {}
    for key in owners:
        by_tenant.setdefault(key[1] if len(key) > 1 else None, []).append(key[0])
    parts: list[ColumnElement[bool]] = []
    for tenant, values in by_tenant.items():
        if dialect == "postgresql":
            ids = bindparam(None, value=values, type_=ARRAY(_element_type(subject)))
            one: ColumnElement[bool] = owner[0] == any_(ids)
        else:
            one = owner[0].in_(values)
        parts.append(one if len(owner) == 1 else and_(owner[1] == tenant, one))
    return or_(false(), *parts)


def _element_type(col: Column[Any]) -> Any:
    """The type of the ids' array for `col`, without a length, precision or scale: a cast to
    one would cut or round an id until it matched someone else's."""
    kind = col.type
    if isinstance(kind, String):
        return Text()
    if isinstance(kind, Float):
        return Float()
    if isinstance(kind, Numeric):
        return Numeric()
    return kind


def _unlink_of(
    request: BatchStepRequest,
    col: Column[Any],
    role: str,
    *,
    described: Reflected | None,
    references: Column[Any] | None,
    dialect: str,
) -> _Unlink:
    """How anonymize breaks the link in `col`, as the data map's `unlink` allows; or
    UnlinkNotPossible, naming the column and what to do instead."""
    step, locator = request.step, SqlEraser.locator(request)
    where = f"system {step.system!r}: column {col.name!r} of table {locator.table!r} ({role})"
    instead = (
        "make the column nullable, or pseudonymize (keeping the link: still personal data) or "
        "delete the rows instead"
    )
    if described is None or not described.primary_key:
        raise UnlinkNotPossible(
            f"system {step.system!r}: anonymize needs a primary key on table {locator.table!r}, "
            "to read back before the commit each row it unlinks; add one, or pseudonymize or "
            "delete the rows instead"
        )
    if locator.unlink == "null" or (locator.unlink is None and col.nullable):
        if not col.nullable:
            raise UnlinkNotPossible(
                f"{where} is NOT NULL, so `unlink: null` cannot break the rows' link to the "
                f"subject: use `unlink: surrogate`, or {instead}"
            )
        return _Unlink(col, role, None)
    if col.name in described.foreign_keys:
        if col.nullable:
            raise UnlinkNotPossible(
                f"{where} is under a foreign key, so a random surrogate would reference no row "
                "(or someone else's): use `unlink: null`"
            )
        raise UnlinkNotPossible(
            f"{where} is NOT NULL and under a foreign key: NULL is refused and a random "
            "surrogate would reference no row (or someone else's), so anonymize cannot break "
            f"the rows' link to the subject; {instead}"
        )
    draw = _surrogate_draw(col, dialect)
    if draw is None:
        raise UnlinkNotPossible(
            f"{where} is of type {type_name(col)}, which has no random surrogate (Lethe draws "
            "them for text of 16 characters or more, 32- and 64-bit integers and UUIDs): "
            + ("use `unlink: null`" if col.nullable else instead)
        )
    return _Unlink(col, role, draw, (col, *([references] if references is not None else [])))


# --- erasing ---------------------------------------------------------------------------------


def _pending(action: str, target: _Target) -> ColumnElement[bool]:
    """True for a subject's row not yet in the erased state: every row for delete and
    anonymize (an anonymised row matches no more), an unmarked or uncleared one otherwise."""
    if action in ("delete", "anonymize"):
        return true()
    oks = [ok for _, ok in _checks(action, target)]
    return not_(and_(*oks)) if oks else false()


async def _found(conn: AsyncConnection, batch: BatchStepRequest, target: _Target) -> _Found:
    """The batch's rows, each with its subject (one statement); for an update, locked until
    the commit (PostgreSQL FOR UPDATE, which needs the UPDATE privilege a delete does not have;
    SQLite locks the database). A delete that then removes another number of rows than
    counted fails with RowsChanged."""
    still = case((_pending(batch.step.action, target), 1), else_=0)
    owned, width = len(target.owner), len(target.primary_key)
    query = (
        select(*target.owner, *target.primary_key, still)
        .select_from(target.source)
        .where(target.found_by)
    )
    if batch.step.action != "delete":
        query = query.with_for_update(of=target.table)
    subjects: dict[int, _Rows] = {}
    pending: dict[tuple[Any, ...], None] = {}
    unkeyed = 0
    for row in (await conn.execute(query)).all():
        key, changes = tuple(row[owned : owned + width]), bool(row[owned + width])
        for index in target.owners.get(_owned(row[:owned], target.padded), []):
            rows = subjects.setdefault(index, _Rows())
            if width and key in rows.keys:
                continue  # met twice along the path: one row
            rows.matched += 1
            rows.pending += changes
            if width:
                rows.keys[key] = None
        if changes and width:
            pending[key] = None
        elif changes:
            unkeyed += 1
    return _Found(subjects=subjects, keys=list(pending), pending=len(pending) + unkeyed)


def _digest(batch: BatchStepRequest, target: _Target, rows: _Rows) -> str | None:
    """SHA-256 of the step and a subject's matched rows' primary keys (without the subject
    column, when it is part of the key: never a hash of the subject id); None without a
    primary key."""
    if not target.primary_key:
        return None
    locator = SqlEraser.locator(batch)
    hashed = [
        index
        for index, col in enumerate(target.primary_key)
        if locator.via or col.name != locator.subject_column
    ]
    listed = sorted([str(key[index]) for index in hashed] for key in rows.keys)
    return hashlib.sha256(json.dumps([batch.step.id, listed]).encode()).hexdigest()


async def _change(
    conn: AsyncConnection,
    batch: BatchStepRequest,
    target: _Target,
    found: _Found,
    values: dict[str, object],
) -> int:
    """Delete, clear or anonymise the batch's rows: one statement for the batch (anonymize:
    one by key, then a read-back). The number of rows changed."""
    action = batch.step.action
    if action == "delete":
        return max((await conn.execute(delete(target.table).where(target.match))).rowcount, 0)
    if action == "anonymize":
        return await _anonymise(conn, batch, target, found.keys, values)
    if not found.pending:
        return 0
    result = await conn.execute(
        update(target.table).where(target.match & _pending(action, target)).values(values)
    )
    return max(result.rowcount, 0)


def _check_changed(batch: BatchStepRequest, pending: int, changed: int) -> None:
    """ChangeRefused or RowsChanged unless the statement changed the rows counted."""
    step, locator = batch.step, SqlEraser.locator(batch)
    if changed < pending and step.action != "delete":
        # The rows are locked: a trigger or rule skipped some, which no retry mends.
        raise ChangeRefused(
            f"system {step.system!r}: {changed} of the {pending} locked row(s) of "
            f"table {locator.table!r} changed (a trigger or rule?); nothing was committed"
        )
    if changed != pending:
        raise RowsChanged(
            f"system {step.system!r}: the subject's rows in table {locator.table!r} "
            f"changed while the step ran ({pending} counted, {changed} changed); "
            "nothing was committed, the step runs again"
        )


async def _anonymise(
    conn: AsyncConnection,
    batch: BatchStepRequest,
    target: _Target,
    found: list[tuple[Any, ...]],
    values: dict[str, object],
) -> int:
    """Clear and unlink the found rows (their primary keys), each by its key, then read them
    back by key: every one must be cleared and lead to no subject of the batch any more (else
    ChangeRefused, and the transaction is rolled back). The number of rows changed."""
    unlink = target.unlink
    assert unlink is not None  # _target plans it for every anonymize step with work to do
    if not found:
        return 0
    new = await _surrogates(conn, batch, unlink, len(found))
    key_names = [f"lethe_key_{index}" for index in range(len(target.primary_key))]
    statement = (
        update(target.table)
        .where(
            and_(
                *(
                    col == bindparam(name, type_=col.type)
                    for col, name in zip(target.primary_key, key_names, strict=True)
                )
            )
        )
        .values({**values, unlink.column.name: bindparam("lethe_unlink", type_=unlink.column.type)})
    )
    result = await conn.execute(
        statement,
        [
            {**dict(zip(key_names, key, strict=True)), "lethe_unlink": value}
            for key, value in zip(found, new, strict=True)
        ],
    )
    changed = max(result.rowcount, 0)
    # Read back by key; where the link column is part of the key, the key is now the new value.
    names = [col.name for col in target.primary_key]
    at = names.index(unlink.column.name) if unlink.column.name in names else None
    keys = [
        key if at is None else (*key[:at], value, *key[at + 1 :])
        for key, value in zip(found, new, strict=True)
    ]
    oks = [ok for _, ok in _checks("anonymize", target)]
    seen = linked = uncleared = 0
    for among in _among(conn, target.primary_key, keys):
        counts = (
            await conn.execute(
                select(
                    func.count(),
                    func.coalesce(func.sum(case((target.match, 1), else_=0)), 0),
                    func.coalesce(func.sum(case((and_(true(), *oks), 0), else_=1)), 0),
                )
                .select_from(target.table)
                .where(among)
            )
        ).one()
        seen, linked, uncleared = seen + counts[0], linked + counts[1], uncleared + counts[2]
    if (seen, linked, uncleared) != (len(keys), 0, 0):
        step, locator = batch.step, SqlEraser.locator(batch)
        raise ChangeRefused(
            f"system {step.system!r}: after anonymising, {seen} of the {len(keys)} row(s) of "
            f"table {locator.table!r} read back by primary key, {linked} still lead to the "
            f"subject and {uncleared} are not cleared (a trigger or rule?); nothing was committed"
        )
    return changed


async def _surrogates(
    conn: AsyncConnection, batch: BatchStepRequest, unlink: _Unlink, count: int
) -> list[object]:
    """`count` new values for the link column: NULLs, or distinct random surrogates that no
    row holds in the columns they must not equal."""
    if unlink.draw is None:
        return [None] * count
    drawn: set[object] = set()
    chosen: list[object] = []
    for _ in range(SURROGATE_DRAWS):
        fresh: list[object] = []
        while len(chosen) + len(fresh) < count:
            value = unlink.draw()
            if value not in drawn:
                drawn.add(value)
                fresh.append(value)
        held: set[object] = set()
        for col in unlink.taken:
            for among in _among(conn, [col], [(value,) for value in fresh]):
                held.update((await conn.execute(select(col).where(among))).scalars())
        chosen += [value for value in fresh if value not in held]
        if len(chosen) == count:
            return chosen
    step, locator = batch.step, SqlEraser.locator(batch)
    raise UnlinkNotPossible(
        f"system {step.system!r}: column {unlink.column.name!r} of table {locator.table!r} "
        f"({unlink.role}): {SURROGATE_DRAWS} draws of random surrogates all met values rows "
        "already hold; use `unlink: null`, or pseudonymize or delete the rows instead"
    )


def keyed(primary_key: list[Column[Any]], keys: Sequence[tuple[Any, ...]]) -> ColumnElement[bool]:
    """True for the rows whose primary key is one of `keys`."""
    if len(primary_key) == 1:
        return primary_key[0].in_([key[0] for key in keys])
    return tuple_(*primary_key).in_(list(keys))


def _among(
    conn: AsyncConnection, cols: list[Column[Any]], keys: Sequence[tuple[Any, ...]]
) -> list[ColumnElement[bool]]:
    """Conditions that together find the rows whose `cols` are one of `keys`: on PostgreSQL
    with one column, one `= ANY(:keys)` whatever their number; else `IN` lists of KEY_CHUNK."""
    if conn.dialect.name == "postgresql" and len(cols) == 1:
        values = [key[0] for key in keys]
        array = bindparam(None, value=values, type_=ARRAY(_element_type(cols[0])))
        return [cols[0] == any_(array)]
    return [keyed(cols, chunk) for chunk in key_chunks(keys)]


def key_chunks(items: Sequence[Any]) -> list[Sequence[Any]]:
    """`items` in chunks of KEY_CHUNK, so that no `IN` list of keys grows unbounded."""
    return [items[start : start + KEY_CHUNK] for start in range(0, len(items), KEY_CHUNK)]


def _erased_detail(request: StepRequest | BatchStepRequest, target: _Target) -> str:
    """What erase did, in words (column names only)."""
    step, locator = request.step, SqlEraser.locator(request)
    if step.action == "delete":
        return f"deleted the subject's rows from {locator.table}"
    verb = {
        "soft_delete": "soft-deleted",
        "pseudonymize": "pseudonymised",
        "anonymize": "anonymised",
    }[step.action]
    detail = (
        f"{verb} the subject's rows in {locator.table}: cleared "
        f"{', '.join(target.clear) or 'no column'}"
    )
    if target.unlink is not None:
        to = "NULL" if target.unlink.draw is None else "a random surrogate for each row"
        detail += f"; unlinked them from the subject ({target.unlink.column.name} set to {to})"
    if step.action == "pseudonymize":
        detail += "; kept their link to the subject (pseudonymised data is still personal data)"
    if target.kept:
        detail += f"; kept {', '.join(target.kept)}"
    return detail


# --- attempts --------------------------------------------------------------------------------


def _attempt() -> int:
    """This activity's attempt (1 outside an activity)."""
    return activity.info().attempt if activity.in_activity() else 1


class _Counts:
    """The ledger of a one-subject erase: the subject's row count (`_Counted`), heartbeated
    inside the transaction before the change; a retry that finds nothing left reports it."""

    def __init__(self, request: StepRequest) -> None:
        self.attempt, self.earlier = _attempt(), _earlier_count(request)
        self.kept_from: _Counted | None = None
        self.counted: _Counted | None = None
        self.confirmed: bool | None = None
        self.digest: str | None = None

    async def plan(self, batch: BatchStepRequest, target: _Target, found: _Found) -> None:
        """Heartbeat the count (or, when nothing is left, the earlier attempt's again)."""
        rows = found.of(0)
        self.digest = _digest(batch, target, rows)
        earlier = self.earlier
        self.kept_from = earlier if earlier is not None and not rows.pending else None
        if self.kept_from is not None:
            _heartbeat(self.kept_from)  # the count of the attempt that did the work stays
        elif rows.pending or self.attempt == 1:
            self.counted = _Counted(
                step=batch.step.id,
                action=batch.step.action,
                attempt=self.attempt,
                rows=rows.matched,
                changed=rows.pending,
                digest=self.digest,
            )
            _heartbeat(self.counted)

    async def confirm(self, changed: int) -> None:
        """Ask Temporal whether it holds the count before the commit."""
        if self.counted is not None and changed:
            self.confirmed = await _confirmed(self.counted)

    def erased(self, changed: int) -> None:
        """Nothing more to tell: the count stays the last heartbeat."""

    def outcome(self, request: StepRequest, done: _Erasure) -> StepOutcome:
        """The step's outcome (`running` until verified), with the earlier attempt's count
        when this one found nothing left to change."""
        step, locator, target = request.step, SqlEraser.locator(request), done.target
        rows = done.found.of(0)
        evidence: Evidence = {
            "table": locator.table,
            "action": step.action,
            "join_hops": len(locator.via),
            "dialect": done.dialect,
        }
        if self.confirmed is not None:
            evidence["count_confirmed"] = self.confirmed
        affected = rows.matched
        evidence.update(_erased_evidence(target, rows.matched, done.changed))
        detail = _erased_detail(request, target)
        if self.attempt > 1:
            evidence["attempt"] = self.attempt
            if not rows.pending:
                affected, more = _earlier_evidence(self.kept_from, rows, self.digest)
                evidence.update(more, rows=affected)
                detail += "; " + _earlier_detail(self.attempt, self.kept_from)
        return StepOutcome(
            step_id=step.id, status="running", affected=affected, evidence=evidence, detail=detail
        )


class _Journaled:
    """The ledger of a batch's erase: the batch's journal (`Journal.resume`), its plan (rows
    to change) heartbeated before the change with each subject's row count keyed by its
    reference, what was changed after the commit. A retry reports, for a subject whose rows it
    finds erased, the count an earlier attempt heartbeated, not 0."""

    def __init__(self, batch: BatchStepRequest) -> None:
        self.journal = Journal.resume(batch)
        told = self.journal.earlier_progress.get(ROWS)
        self.earlier: dict[str, int] | None = None
        if isinstance(told, Mapping):
            self.earlier = {str(ref): n for ref, n in told.items() if isinstance(n, int) and n >= 0}
        self.rows: dict[int, int] = {}
        """Each subject's reported row count, by index."""
        self.kept: set[int] = set()
        """The subjects whose count is an earlier attempt's."""

    async def plan(self, batch: BatchStepRequest, target: _Target, found: _Found) -> None:
        """Heartbeat each subject's row count and the rows to change, and wait (briefly) until
        Temporal holds them."""
        self.count(batch, found)
        self.journal.progress[ROWS] = {
            batch.subjects[index].subject_ref: n for index, n in self.rows.items() if n
        }
        await self.journal.plan(rows_changed=found.pending)

    def count(self, batch: BatchStepRequest, found: _Found) -> None:
        """Each subject's row count: its own, or, when this retry finds nothing left to change,
        the count an earlier attempt heartbeated."""
        retry = self.journal.attempt > 1
        for index, item in enumerate(batch.subjects):
            rows = found.of(index)
            told = (self.earlier or {}).get(item.subject_ref)
            if retry and not rows.pending and told is not None:
                self.rows[index] = told
                self.kept.add(index)
            else:
                self.rows[index] = rows.matched

    async def confirm(self, changed: int) -> None:
        """Nothing: the plan waited for Temporal already."""

    def erased(self, changed: int) -> None:
        """Heartbeat the rows changed."""
        self.journal.erased(rows_changed=changed)

    def outcome(self, batch: BatchStepRequest, done: _Erasure) -> BatchStepOutcome:
        """One outcome per subject (`running` until verified; `failed` for an id that does not
        fit, `retained` when every column is kept), and the batch's evidence (counts only)."""
        if done.retained is not None:
            detail = retained_outcome(batch.single(batch.subjects[0]), done.retained).detail
            return BatchStepOutcome(
                step_id=batch.step.id,
                outcomes=[
                    SubjectOutcome(subject_ref=s.subject_ref, status="retained", detail=detail)
                    for s in batch.subjects
                ],
                detail=detail,
            )
        if not self.rows:
            self.count(batch, done.found)
        outcomes = [self._subject(index, item, done) for index, item in enumerate(batch.subjects)]
        locator, target = SqlEraser.locator(batch), done.target
        evidence: Evidence = {
            "table": locator.table,
            "action": batch.step.action,
            "join_hops": len(locator.via),
            "dialect": done.dialect,
            "subjects": len(batch.subjects),
            "subjects_not_fitting": len(target.unfit),
            **_erased_evidence(target, sum(o.affected for o in outcomes), done.changed),
            **self.journal.evidence(),
        }
        if self.journal.attempt > 1:
            evidence["attempt"] = self.journal.attempt
            evidence["subjects_counted_by_earlier_attempt"] = len(self.kept)
        return BatchStepOutcome(
            step_id=batch.step.id,
            outcomes=outcomes,
            evidence=evidence,
            detail=_erased_detail(batch, target),
        )

    def _subject(self, index: int, item: BulkSubject, done: _Erasure) -> SubjectOutcome:
        """One subject's outcome of erase (before verify)."""
        unfit = done.target.unfit.get(index)
        if unfit is not None:
            return SubjectOutcome(subject_ref=item.subject_ref, status="failed", detail=str(unfit))
        detail = ""
        if index in self.kept:
            detail = (
                f"an earlier attempt had done it ({self.rows[index]} row(s), as it heartbeated "
                f"before committing); attempt {self.journal.attempt} found nothing left to change"
            )
        elif self.earlier is None and self.journal.attempt > 1 and not done.found.of(index).pending:
            detail = (
                f"attempt {self.journal.attempt} found nothing left to change, and no earlier "
                "attempt's count arrived, so how many rows an earlier attempt changed is not known"
            )
        return SubjectOutcome(
            subject_ref=item.subject_ref,
            status="running",
            affected=self.rows.get(index, 0),
            detail=detail,
        )


def _erased_evidence(target: _Target, rows: int, changed: int) -> Evidence:
    """The counts erase reports: rows found and changed, columns cleared and kept, the link
    broken."""
    evidence: Evidence = {
        "rows": rows,
        "rows_changed": changed,
        "columns_cleared": len(target.clear),
        "columns_kept": len(target.kept),
    }
    if target.unlink is not None:
        evidence.update(
            unlinked_column=target.unlink.column.name,
            unlinked_to=target.unlink.to,
            rows_checked=changed,
        )
    return evidence


def _heartbeat(counted: _Counted) -> None:
    """Tell a later attempt what this step counted before committing (outside an activity,
    nothing). Best-effort: the SDK sends it asynchronously."""
    heartbeat(counted.model_dump())


async def _confirmed(counted: _Counted) -> bool:
    """Whether Temporal holds `counted` as this attempt's last heartbeat, within
    COUNT_CONFIRM_SECONDS: erase asks before it commits, so that a retry after a lost worker
    finds the count; when it does not, the commit goes ahead and a retry says the count is not
    known."""
    return await last_heartbeat_held(counted.model_dump(), COUNT_CONFIRM_SECONDS)


def _earlier_count(request: StepRequest) -> _Counted | None:
    """The count an earlier attempt of this activity heartbeated for this step, if one arrived."""
    if not activity.in_activity():
        return None
    details = activity.info().heartbeat_details
    last = details[-1] if details else None
    if isinstance(last, BaseModel):
        last = last.model_dump()
    try:
        counted = _Counted.model_validate(last)
    except ValidationError:
        return None
    if counted.step != request.step.id or counted.action != request.step.action:
        return None
    return counted


def _earlier_evidence(
    earlier: _Counted | None, rows: _Rows, digest: str | None
) -> tuple[int, Evidence]:
    """For a retry that found nothing left to change: the count to report and the evidence."""
    if earlier is None:
        return rows.matched, {"rows_from_attempt": None}
    evidence: Evidence = {
        "rows_from_attempt": earlier.rows,
        "counted_by_attempt": earlier.attempt,
    }
    if rows.matched and digest is not None and earlier.digest is not None:
        # Rows that stay (soft delete, pseudonymise) can be compared with those counted then.
        evidence["rows_same_as_attempt"] = digest == earlier.digest
    return earlier.rows, evidence


def _earlier_detail(attempt: int, earlier: _Counted | None) -> str:
    if earlier is None:
        return (
            f"attempt {attempt} found nothing left to change, and no earlier attempt's count "
            "arrived (heartbeats are best-effort), so how many rows an earlier attempt changed "
            "is not known"
        )
    return (
        f"attempt {earlier.attempt} had done it ({earlier.rows} row(s), {earlier.changed} "
        f"changed, as it heartbeated before committing); attempt {attempt} found nothing left "
        "to change"
    )


# --- values ----------------------------------------------------------------------------------


def subject_value(subject_id: str, col: Column[Any], table: str, dialect: str) -> object:
    """The subject id converted to the subject column's type, or SubjectIdDoesNotFit."""
    kind = col.type
    does_not_fit = SubjectIdDoesNotFit(
        f"the subject id does not fit column {col.name!r} of table {table!r} "
        f"(type {type_name(col)})"
    )
    if isinstance(kind, NullType):
        return subject_id  # SQLite columns declared without a type compare as given
    if isinstance(kind, String) and not isinstance(kind, Enum):
        if "\x00" in subject_id:
            raise does_not_fit
        return subject_id
    if isinstance(kind, Integer):
        bits = 16 if isinstance(kind, SmallInteger) else 32
        if isinstance(kind, BigInteger) or dialect == "sqlite":
            bits = 64
        if not _INTEGER.fullmatch(subject_id):
            raise does_not_fit
        number = int(subject_id)
        if not -(2 ** (bits - 1)) <= number < 2 ** (bits - 1):
            raise does_not_fit
        return number
    if isinstance(kind, Float):
        if not _DECIMAL.fullmatch(subject_id):
            raise does_not_fit
        return float(subject_id)
    if isinstance(kind, Numeric):
        if not _DECIMAL.fullmatch(subject_id):
            raise does_not_fit
        return Decimal(subject_id)
    if isinstance(kind, Uuid):
        try:
            return uuid.UUID(subject_id)
        except ValueError:
            raise does_not_fit from None
    raise does_not_fit


def placeholder(col: Column[Any], category: str, system: str, table: str) -> object:
    """An anonymous, type-valid value for a NOT NULL personal column."""
    kind = col.type
    if isinstance(kind, String) and not isinstance(kind, Enum):
        text = EMAIL_PLACEHOLDER if matches("user.contact.email", category) else TEXT_PLACEHOLDER
        if kind.length is not None and len(text) > kind.length:
            text = TEXT_PLACEHOLDER[: kind.length]
        return text
    if isinstance(kind, DateTime):
        return DATETIME_PLACEHOLDER.replace(tzinfo=UTC) if kind.timezone else DATETIME_PLACEHOLDER
    if isinstance(kind, Date):
        return DATE_PLACEHOLDER
    if isinstance(kind, Time):
        return time(0, 0)
    if isinstance(kind, Interval):
        return timedelta(0)
    if isinstance(kind, Boolean):
        return False
    if isinstance(kind, Integer):
        return 0
    if isinstance(kind, Numeric):
        return Decimal(0) if kind.asdecimal else 0.0
    if isinstance(kind, Uuid):
        return uuid.UUID(int=0)
    if isinstance(kind, LargeBinary):
        return b""
    raise NoPlaceholder(
        f"system {system!r}: column {col.name!r} of table {table!r} is NOT NULL and of type "
        f"{type_name(col)}, which has no anonymous placeholder; make it nullable, keep it, or "
        "delete the rows instead"
    )


def _surrogate_draw(col: Column[Any], dialect: str) -> Callable[[], object] | None:
    """What draws a random surrogate for a link column of `col`'s type, a new one each call;
    None for a type that has none. Text: `anon-` and 128 random bits (64 in a short column);
    integers: negative, at least 2**(bits-2) from zero (ids and sentinels are not); UUIDs: v4."""
    kind = col.type
    if isinstance(kind, Uuid):
        as_uuid = kind.as_uuid
        return lambda: uuid.uuid4() if as_uuid else str(uuid.uuid4())
    if isinstance(kind, Integer):
        if isinstance(kind, SmallInteger):
            return None  # too few values to stay apart from real ids
        bits = 64 if isinstance(kind, BigInteger) or dialect == "sqlite" else 32
        low, high = 2 ** (bits - 2), 2 ** (bits - 1) - 1
        return lambda: -(low + secrets.randbelow(high - low + 1))
    if isinstance(kind, NullType) or (isinstance(kind, String) and not isinstance(kind, Enum)):
        length = getattr(kind, "length", None)
        prefix = len(SURROGATE_PREFIX)
        if length is None or length >= prefix + 32:
            return lambda: SURROGATE_PREFIX + secrets.token_hex(16)
        if length >= prefix + 16:
            size = (length - prefix) // 2
            return lambda: SURROGATE_PREFIX + secrets.token_hex(size)
        if length >= 16:
            size = length // 2
            return lambda: secrets.token_hex(size)
    return None


def _soft_delete_value(request: BatchStepRequest, target: _Target) -> dict[str, object]:
    """The soft-delete column's new value: the first deletion time stays (COALESCE)."""
    locator, col = SqlEraser.locator(request), target.soft_delete
    if col is None:
        raise SoftDeleteNotPossible(
            f"step {request.step.id}: table {locator.table!r} has no soft_delete_column in the "
            "data map, which soft_delete needs"
        )
    kind = col.type
    now = datetime.now(UTC)
    if isinstance(kind, DateTime):
        stamp = now if kind.timezone else now.replace(tzinfo=None)
        return {col.name: func.coalesce(col, literal(stamp, kind))}
    if isinstance(kind, Date):
        return {col.name: func.coalesce(col, literal(now.date(), kind))}
    if isinstance(kind, Boolean):
        return {col.name: True}
    raise SoftDeleteNotPossible(
        f"system {request.step.system!r}: soft-delete column {col.name!r} of table "
        f"{locator.table!r} is of type {type_name(col)}; Lethe sets a timestamp, date or boolean"
    )


def _checks(action: str, target: _Target) -> list[tuple[str, ColumnElement[bool]]]:
    """Per column, the condition an erased row meets (for delete: none, rows must be gone; for
    anonymize the broken link is checked apart)."""
    if action == "delete":
        return []
    table = target.table
    checks: list[tuple[str, ColumnElement[bool]]] = []
    if action == "soft_delete" and target.soft_delete is not None:
        col = target.soft_delete
        marked = col.is_(True) if isinstance(col.type, Boolean) else col.is_not(None)
        checks.append((col.name, marked))
    for name, value in target.clear.items():
        col = table.c[name]
        checks.append((name, col.is_(None) if value is None else or_(col.is_(None), col == value)))
    return checks


def type_name(col: Column[Any]) -> str:
    """The column's SQL type as the dialect names it, else the type's class name."""
    try:
        return str(col.type)
    except SQLAlchemyError:
        return type(col.type).__name__
