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
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import (
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
    MetaData,
    Numeric,
    SmallInteger,
    String,
    Table,
    Time,
    Uuid,
    and_,
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
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.types import NullType
from temporalio import activity

from lethe.activities.attempts import heartbeat, heartbeat_held
from lethe.activities.clients import Clients
from lethe.activities.common import SchemaMismatch, retained_outcome, verdict
from lethe.activities.connector import Connector
from lethe.activities.driver_errors import SchemaChanged, translated, undefined_name
from lethe.activities.sql_schema import Reflected, SchemaCache, Tables
from lethe.classification.datamap import SqlTableLocator
from lethe.classification.taxonomy import matches
from lethe.contracts import Action, Evidence, StepOutcome, StepRequest, SweepBatch, SweepResult
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
    """A step's table as the live database has it, with the subject match and what to clear."""

    tables: list[Table]
    """Every table the step reads: the erased one, then those of its join path."""
    table: Table
    match: ColumnElement[bool]
    """True for the subject's rows: on the table itself or through the join path."""
    soft_delete: Column[Any] | None
    kept: list[str]
    primary_key: list[Column[Any]] = field(default_factory=list)
    """The erased table's primary key columns (empty when it has none)."""
    clear: dict[str, object] = field(default_factory=dict)
    """Personal column -> the value it is cleared to: None (NULL) or a typed placeholder."""
    unlink: _Unlink | None = None
    """For `anonymize`: the link to break."""


@dataclass(frozen=True)
class _Found:
    """The subject's rows as erase's transaction found (and locked) them, before changing any."""

    matched: int
    """Rows of the subject: on the table itself or through the join path."""
    pending: int
    """Of those, rows not yet in the erased state: what the step changes."""
    keys: list[tuple[Any, ...]]
    """The primary keys of the pending rows (empty when the table has no primary key)."""
    digest: str | None
    """SHA-256 of the step and the matched rows' primary keys (without the subject column, when
    it is part of the key: never a hash of the subject id); None without a primary key."""


class _Counted(BaseModel):
    """What an attempt heartbeats inside its transaction, before it changes any row: how many
    of the subject's rows the step covers and changes, and which (a digest of their keys)."""

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
    checks = (
        "the database answers; tables, columns and join path exist as mapped; the subject id "
        "fits its column; anonymize can unlink; the role's privileges (PostgreSQL)"
    )
    proves = (
        "no row matches the subject (delete, anonymize), or every matching row is marked and "
        "cleared (soft_delete, pseudonymize)"
    )
    retries = "the row count heartbeated inside the transaction before the commit"
    sweeps = (
        "rows past the limit and every obligation, outside holds, deleted, soft-deleted or "
        "anonymised in keyset batches by (date, key), one transaction each"
    )

    def __init__(self, engine: AsyncEngine, schemas: SchemaCache | None = None) -> None:
        """Use `engine` and the descriptions of its tables in `schemas` (the worker's, from
        `open`; a cache of its own by default)."""
        self.engine = engine
        self.schemas = schemas or SchemaCache()

    @classmethod
    def open(cls, clients: Clients, connection: str) -> Self:
        """The eraser for a connection string, over the worker's engine and descriptions."""
        return cls(clients.sql_engine(connection), clients.sql_schemas(connection))

    async def erase(self, request: StepRequest) -> StepOutcome:
        """Delete, soft-delete, pseudonymise or anonymise the subject's rows in one
        transaction. A retry that finds the work done reports the earlier attempt's count."""
        return await self._on_current_schema(request, self._erase(request))

    async def verify(self, request: StepRequest, erased: StepOutcome) -> StepOutcome:
        """Check the erasure held: rows gone, unlinked, or marked and cleared; `done` or
        `failed`."""
        return await self._on_current_schema(request, self._verify(request, erased))

    async def sweep(self, batch: SweepBatch) -> SweepResult:
        """One batch of a retention sweep over one table (`lethe.activities.sql_retention`)."""
        # Imported here: the sweep builds on this module's helpers.
        from lethe.activities.sql_retention import sweep_table

        return await sweep_table(self.engine, self.schemas, batch)

    async def _on_current_schema(
        self, request: StepRequest, work: Awaitable[StepOutcome]
    ) -> StepOutcome:
        """Run `work`; when its statement met tables that changed since they were described,
        forget the description and read the tables again: what the data map names and the
        database lacks is a SchemaMismatch naming it, else the step runs again (retryable)."""
        try:
            return await work
        except SchemaChanged as exc:
            changed = exc
        # Outside the handler, so that the SchemaMismatch below stands alone.
        self.schemas.forget(table_names(self.locator(request)))
        async with database_errors(request.step.system), self.engine.connect() as conn:
            await _target(conn, request, self.schemas, fresh=True)
        raise changed

    async def _erase(self, request: StepRequest) -> StepOutcome:
        step = request.step
        locator = self.locator(request)
        evidence: Evidence = {
            "table": locator.table,
            "action": step.action,
            "join_hops": len(locator.via),
        }
        attempt, earlier = _attempt(), _earlier_count(request)
        async with database_errors(step.system), self.engine.connect() as conn:
            target = await _target(conn, request, self.schemas)
            evidence["dialect"] = conn.dialect.name
            if (
                step.action in ("pseudonymize", "anonymize")
                and not target.clear
                and target.unlink is None
            ):
                return retained_outcome(
                    request, f"every personal column of {locator.table} is kept"
                )
            values = dict(target.clear)
            if step.action == "soft_delete":
                values.update(_soft_delete_value(request, target))
            found = await _found(conn, request, target)
            kept_from = earlier if earlier is not None and not found.pending else None
            counted = None
            if kept_from is not None:
                _heartbeat(kept_from)  # the count of the attempt that did the work stays
            elif found.pending or attempt == 1:
                counted = _Counted(
                    step=step.id,
                    action=step.action,
                    attempt=attempt,
                    rows=found.matched,
                    changed=found.pending,
                    digest=found.digest,
                )
                _heartbeat(counted)
            if step.action == "delete":
                changed = max(
                    (await conn.execute(delete(target.table).where(target.match))).rowcount, 0
                )
            elif step.action == "anonymize":
                changed = await _anonymise(conn, request, target, found, values)
            elif found.pending:
                result = await conn.execute(
                    update(target.table)
                    .where(target.match & _pending(step.action, target))
                    .values(values)
                )
                changed = max(result.rowcount, 0)
            else:
                changed = 0
            if changed < found.pending and step.action != "delete":
                # The rows are locked: a trigger or rule skipped some, which no retry mends.
                raise ChangeRefused(
                    f"system {step.system!r}: {changed} of the {found.pending} locked row(s) of "
                    f"table {locator.table!r} changed (a trigger or rule?); nothing was committed"
                )
            if changed != found.pending:
                raise RowsChanged(
                    f"system {step.system!r}: the subject's rows in table {locator.table!r} "
                    f"changed while the step ran ({found.pending} counted, {changed} changed); "
                    "nothing was committed, the step runs again"
                )
            if counted is not None and changed:
                evidence["count_confirmed"] = await _confirmed(counted)
            await self._commit(conn)
        affected = found.matched
        evidence.update(
            rows=affected,
            rows_changed=changed,
            columns_cleared=len(target.clear),
            columns_kept=len(target.kept),
        )
        detail = _erased_detail(request, target)
        if target.unlink is not None:
            evidence.update(
                unlinked_column=target.unlink.column.name,
                unlinked_to=target.unlink.to,
                rows_checked=changed,
            )
        if attempt > 1:
            evidence["attempt"] = attempt
            if not found.pending:
                affected, more = _earlier_evidence(kept_from, found)
                evidence.update(more, rows=affected)
                detail += "; " + _earlier_detail(attempt, kept_from)
        return StepOutcome(
            step_id=step.id, status="running", affected=affected, evidence=evidence, detail=detail
        )

    async def _commit(self, conn: AsyncConnection) -> None:
        """Commit the step's transaction: once this returns, the effect is made (its own method,
        so tests/e2e/crash_after_effect.py can end a worker right after it)."""
        await conn.commit()

    async def _verify(self, request: StepRequest, erased: StepOutcome) -> StepOutcome:
        step = request.step
        locator = self.locator(request)
        if erased.status in ("retained", "failed"):
            return erased
        async with database_errors(step.system), self.engine.connect() as conn:
            target = await _target(conn, request, self.schemas, unlink=False)
            # Anonymised rows cannot be found any more: none may lead to the subject.
            checks = [] if step.action == "anonymize" else _checks(step.action, target)
            counts = (
                await conn.execute(
                    select(
                        func.count(),
                        *(func.coalesce(func.sum(case((ok, 0), else_=1)), 0) for _, ok in checks),
                    )
                    .select_from(target.table)
                    .where(target.match)
                )
            ).one()
        matching, failing = int(counts[0]), [int(n) for n in counts[1:]]
        evidence: Evidence = {
            "table": locator.table,
            "action": step.action,
            "rows_matching": matching,
        }
        if step.action == "delete":
            evidence["rows_remaining"] = matching
            if matching:
                return verdict(
                    erased,
                    evidence,
                    [f"{matching} row(s) of {locator.table} still match the subject after delete"],
                )
        if step.action == "anonymize":
            evidence["rows_linked"] = matching
            if matching:
                return verdict(
                    erased,
                    evidence,
                    [
                        f"{matching} row(s) of {locator.table} still lead to the subject after "
                        "anonymize"
                    ],
                )
            checked = erased.evidence.get("rows_checked")
            return verdict(
                erased,
                evidence,
                [],
                f"verified anonymize in {locator.table}: no row leads to the subject any more"
                + (
                    f"; the {checked} row(s) changed were read back by primary key, cleared and "
                    "unlinked, before the commit"
                    if isinstance(checked, int) and checked
                    else ""
                ),
            )
        for (name, _), count in zip(checks, failing, strict=True):
            evidence[f"rows_not_cleared.{name}"] = count
        problems = [
            f"{n} of the subject's row(s) in {locator.table} still have column "
            f"{name} {'unset' if name == locator.soft_delete_column else 'uncleared'}"
            for (name, _), n in zip(checks, failing, strict=True)
            if n
        ]
        return verdict(erased, evidence, problems, f"verified {step.action} in {locator.table}")

    async def preflight(self, request: StepRequest) -> list[str]:
        """Touching nothing: the database answers, the tables, columns and join path are as
        the data map says, the subject id fits, `anonymize` can unlink the rows, and
        (PostgreSQL) the role may do the step."""
        step = request.step
        locator = self.locator(request)
        async with database_errors(step.system), self.engine.connect() as conn:
            try:
                # The preflight is the check: it reads the tables afresh.
                await _target(conn, request, self.schemas, fresh=True)
            except LetheError as exc:
                return [f"{type(exc).__name__}: {exc}"]
            if conn.dialect.name != "postgresql":
                return []  # SQLite has no privileges to check
            needed = {locator.table: "DELETE" if step.action == "delete" else "UPDATE"}
            return [
                f"system {step.system!r}: the database role may not {privilege} on table {table!r}"
                for table, privilege in [
                    *needed.items(),
                    *(
                        (name, "SELECT")
                        for name in [locator.table, *(h.table for h in locator.via)]
                    ),
                ]
                if not (
                    await conn.execute(
                        select(func.has_table_privilege(literal(table), literal(privilege)))
                    )
                ).scalar_one()
            ]


# --- the step's target -----------------------------------------------------------------------


def database_errors(system: str) -> translated:
    """Driver errors as Lethe's, naming the system (never the driver's text)."""
    return translated(f"database of system {system!r}", ChangeRefused, schema_changes=True)


def table_names(locator: SqlTableLocator) -> list[str]:
    """The tables a step reads: the erased one, then those of its join path."""
    return list(dict.fromkeys([locator.table, *(hop.table for hop in locator.via)]))


def described_tables(system: str, names: Sequence[str], reflected: Tables) -> dict[str, Table]:
    """The tables `names` as `reflected` describes them, by name; SchemaMismatch naming one the
    database lacks."""
    metadata = MetaData()
    tables: dict[str, Table] = {}
    for name in names:
        described = reflected[name]
        if described is None:
            raise SchemaMismatch(f"system {system!r} has no table {name!r}")
        schema, _, bare = name.rpartition(".")
        tables[name] = Table(
            bare,
            metadata,
            *(
                Column(
                    c["name"],
                    c["type"],
                    nullable=c["nullable"],
                    primary_key=c["name"] in described.primary_key,
                )
                for c in described.columns
            ),
            schema=schema or None,
        )
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
    request: StepRequest,
    schemas: SchemaCache,
    *,
    unlink: bool = True,
    fresh: bool = False,
) -> _Target:
    """Describe the step's tables (kept, or `fresh`), check the data map against them, and
    build the subject match (and, for `anonymize` unless `unlink` is False, how to break the
    rows' link)."""
    locator = SqlEraser.locator(request)
    names = table_names(locator)
    reflected, kept = await schemas.tables(conn, names, locator.table, fresh=fresh)
    if kept:
        # A kept description may be stale: any mismatch, or a described column the database
        # no longer has, is checked against the tables read afresh before it counts.
        try:
            target = _target_of(request, reflected, conn.dialect.name, unlink=unlink)
            await _still_described(conn, target)
            return target
        except SchemaMismatch:
            pass
        except DBAPIError as exc:
            if not undefined_name(exc):
                raise
            await conn.rollback()  # nothing was done yet: the failed probe only
        reflected, _ = await schemas.tables(conn, names, locator.table, fresh=True)
    return _target_of(request, reflected, conn.dialect.name, unlink=unlink)


async def _still_described(conn: AsyncConnection, target: _Target) -> None:
    """Select every described column of the step's tables, reading no row: fails (UndefinedColumn)
    when one was dropped since the tables were described."""
    for table in target.tables:
        await conn.execute(select(*table.c).limit(0))


def _target_of(request: StepRequest, reflected: Tables, dialect: str, *, unlink: bool) -> _Target:
    """The step's target on tables as `reflected` describes them; SchemaMismatch naming what
    the data map names and they lack."""
    step, locator = request.step, SqlEraser.locator(request)
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
    previous_name = locator.table
    for index, hop in enumerate(locator.via, 1):
        column(previous_name, hop.column, f"the join column of hop {index}")
        column(hop.table, hop.references, f"the column hop {index} references")
        joined = tables[hop.table].alias(f"lethe_path_{index}")
        hops.append((previous.c[hop.column], joined.c[hop.references]))
        previous, previous_name = joined, hop.table
    subject = column(previous_name, locator.subject_column, "the subject column")
    value = subject_value(request.subject.subject_id, subject, previous_name, dialect)
    match: ColumnElement[bool] = previous.c[locator.subject_column] == value
    if locator.tenant_column is not None:
        # The subject is (tenant, id): another tenant's subject with the same id stays.
        column(previous_name, locator.tenant_column, "the tenant column")
        match = match & (previous.c[locator.tenant_column] == request.subject.tenant)
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
            request,
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
        soft_delete=soft_delete,
        kept=kept,
        primary_key=list(table.primary_key.columns),
        clear=clear,
        unlink=broken,
    )


def _unlink_of(
    request: StepRequest,
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


async def _found(conn: AsyncConnection, request: StepRequest, target: _Target) -> _Found:
    """The subject's rows; for an update, locked until the commit (PostgreSQL FOR UPDATE, which
    needs the UPDATE privilege a delete does not have; SQLite locks the database). A delete
    that then removes another number of rows than counted fails with RowsChanged."""
    still = case((_pending(request.step.action, target), 1), else_=0)
    width = len(target.primary_key)
    query = select(*target.primary_key, still).select_from(target.table).where(target.match)
    if request.step.action != "delete":
        query = query.with_for_update()
    rows = (await conn.execute(query)).all()
    keys = [tuple(row[:width]) for row in rows]
    digest = None
    if width:
        # Never a hash of the subject id: a key column that holds it is left out.
        locator = SqlEraser.locator(request)
        hashed = [
            index
            for index, col in enumerate(target.primary_key)
            if locator.via or col.name != locator.subject_column
        ]
        listed = sorted([str(key[index]) for index in hashed] for key in keys)
        digest = hashlib.sha256(json.dumps([request.step.id, listed]).encode()).hexdigest()
    return _Found(
        matched=len(rows),
        pending=sum(1 for row in rows if row[width]),
        keys=[key for key, row in zip(keys, rows, strict=True) if row[width]] if width else [],
        digest=digest,
    )


async def _anonymise(
    conn: AsyncConnection,
    request: StepRequest,
    target: _Target,
    found: _Found,
    values: dict[str, object],
) -> int:
    """Clear and unlink the found rows, each by its primary key, then read them back by key:
    every one must be cleared and lead to the subject no more (else ChangeRefused, and the
    transaction is rolled back). The number of rows changed."""
    unlink = target.unlink
    assert unlink is not None  # _target plans it for every anonymize step with work to do
    if not found.keys:
        return 0
    new = await _surrogates(conn, request, unlink, len(found.keys))
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
            for key, value in zip(found.keys, new, strict=True)
        ],
    )
    changed = max(result.rowcount, 0)
    # Read back by key; where the link column is part of the key, the key is now the new value.
    names = [col.name for col in target.primary_key]
    at = names.index(unlink.column.name) if unlink.column.name in names else None
    keys = [
        key if at is None else (*key[:at], value, *key[at + 1 :])
        for key, value in zip(found.keys, new, strict=True)
    ]
    oks = [ok for _, ok in _checks("anonymize", target)]
    seen = linked = uncleared = 0
    for chunk in key_chunks(keys):
        counts = (
            await conn.execute(
                select(
                    func.count(),
                    func.coalesce(func.sum(case((target.match, 1), else_=0)), 0),
                    func.coalesce(func.sum(case((and_(true(), *oks), 0), else_=1)), 0),
                )
                .select_from(target.table)
                .where(keyed(target.primary_key, chunk))
            )
        ).one()
        seen, linked, uncleared = seen + counts[0], linked + counts[1], uncleared + counts[2]
    if (seen, linked, uncleared) != (len(keys), 0, 0):
        step, locator = request.step, SqlEraser.locator(request)
        raise ChangeRefused(
            f"system {step.system!r}: after anonymising, {seen} of the {len(keys)} row(s) of "
            f"table {locator.table!r} read back by primary key, {linked} still lead to the "
            f"subject and {uncleared} are not cleared (a trigger or rule?); nothing was committed"
        )
    return changed


async def _surrogates(
    conn: AsyncConnection, request: StepRequest, unlink: _Unlink, count: int
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
            for chunk in key_chunks(fresh):
                held.update((await conn.execute(select(col).where(col.in_(chunk)))).scalars())
        chosen += [value for value in fresh if value not in held]
        if len(chosen) == count:
            return chosen
    step, locator = request.step, SqlEraser.locator(request)
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


def key_chunks(items: Sequence[Any]) -> list[Sequence[Any]]:
    """`items` in chunks of KEY_CHUNK, so that no `IN` list of keys grows unbounded."""
    return [items[start : start + KEY_CHUNK] for start in range(0, len(items), KEY_CHUNK)]


def _erased_detail(request: StepRequest, target: _Target) -> str:
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


def _heartbeat(counted: _Counted) -> None:
    """Tell a later attempt what this step counted before committing (outside an activity,
    nothing). Best-effort: the SDK sends it asynchronously."""
    heartbeat(counted.model_dump())


async def _confirmed(counted: _Counted) -> bool:
    """Whether Temporal holds `counted` as this attempt's last heartbeat, within
    COUNT_CONFIRM_SECONDS: erase asks before it commits, so that a retry after a lost worker
    finds the count; when it does not, the commit goes ahead and a retry says the count is not
    known."""
    wanted = counted.model_dump()
    return await heartbeat_held(
        lambda details: bool(details) and details[-1] == wanted, COUNT_CONFIRM_SECONDS
    )


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


def _earlier_evidence(earlier: _Counted | None, found: _Found) -> tuple[int, Evidence]:
    """For a retry that found nothing left to change: the count to report and the evidence."""
    if earlier is None:
        return found.matched, {"rows_from_attempt": None}
    evidence: Evidence = {
        "rows_from_attempt": earlier.rows,
        "counted_by_attempt": earlier.attempt,
    }
    if found.matched and found.digest is not None and earlier.digest is not None:
        # Rows that stay (soft delete, pseudonymise) can be compared with those counted then.
        evidence["rows_same_as_attempt"] = found.digest == earlier.digest
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


def _soft_delete_value(request: StepRequest, target: _Target) -> dict[str, object]:
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
