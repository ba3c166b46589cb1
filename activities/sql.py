"""The SQL connector: deletes, soft-deletes or anonymises a subject's rows with SQLAlchemy Core.

Works on PostgreSQL (`postgresql+psycopg://`) and SQLite (`sqlite+aiosqlite://`) through the
async engine, one engine per connection string. Before a step touches anything it reflects the
live tables and checks every table and column the data map names; identifiers are used only as
SQLAlchemy Table and Column objects and the subject id only as a bound parameter of the subject
column's type. Errors name systems, tables and columns, never the subject id or row contents.
"""

from __future__ import annotations

import re
import uuid
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

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
    case,
    delete,
    func,
    inspect,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.engine.interfaces import ReflectedColumn
from sqlalchemy.exc import (
    NoSuchTableError,
    SQLAlchemyError,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.types import NullType

from activities.common import (
    SchemaMismatch,
    connector_activities,
    retained_outcome,
    verdict,
)
from activities.sql_errors import translated
from classification.datamap import SqlTableLocator
from classification.taxonomy import matches
from lethe.contracts import Evidence, StepOutcome, StepRequest
from lethe.errors import ConfigurationError, LetheError

CONNECT_TIMEOUT_SECONDS = 5
TEXT_PLACEHOLDER = "erased"
EMAIL_PLACEHOLDER = "erased@erased.invalid"
DATE_PLACEHOLDER = date(1900, 1, 1)
DATETIME_PLACEHOLDER = datetime(1970, 1, 1)
"""Naive; given the UTC zone for columns that store one."""
_INTEGER = re.compile(r"-?[0-9]{1,20}")
_DECIMAL = re.compile(r"-?[0-9]{1,40}(\.[0-9]{1,40})?")


class SubjectIdDoesNotFit(LetheError):
    """The subject id cannot be compared with the subject column (text in an integer column)."""


class SoftDeleteNotPossible(LetheError):
    """A soft delete was asked for a table the data map gives no usable soft-delete column."""


class NoPlaceholder(LetheError):
    """A NOT NULL personal column has a type Lethe has no anonymous placeholder for."""


class ChangeRefused(LetheError):
    """The database refused a statement (a constraint, a type, a permission)."""


class UnsupportedStep(LetheError):
    """The step is not one the SQL connector runs: another kind, or an action SQL lacks."""


_ENGINES: dict[str, AsyncEngine] = {}


def engine_for(url: str) -> AsyncEngine:
    """The cached async engine for a connection string, created on first use."""
    engine = _ENGINES.get(url)
    if engine is None:
        connect_args: dict[str, object] = (
            {"connect_timeout": CONNECT_TIMEOUT_SECONDS} if url.startswith("postgresql") else {}
        )
        try:
            engine = create_async_engine(url, pool_pre_ping=True, connect_args=connect_args)
        except (SQLAlchemyError, ValueError, ImportError) as exc:
            raise ConfigurationError(
                f"the connection is not a usable async SQLAlchemy URL ({type(exc).__name__}); "
                "use postgresql+psycopg:// or sqlite+aiosqlite://"
            ) from None
        _ENGINES[url] = engine
    return engine


async def dispose_engines() -> None:
    """Close every cached engine's connections (worker shutdown, end of a test session)."""
    engines = list(_ENGINES.values())
    _ENGINES.clear()
    for engine in engines:
        await engine.dispose()


@dataclass(frozen=True)
class _Target:
    """A step's table as the live database has it, with the subject match and what to clear."""

    table: Table
    match: ColumnElement[bool]
    """True for the subject's rows: on the table itself or through the join path."""
    soft_delete: Column[Any] | None
    kept: list[str]
    clear: dict[str, object] = field(default_factory=dict)
    """Personal column -> the value it is cleared to: None (NULL) or a typed placeholder."""


class SqlEraser:
    """Erases one subject's rows from one table of a relational database."""

    def __init__(self, engine: AsyncEngine) -> None:
        """Use `engine`; prefer `for_connection`, which shares engines between requests."""
        self.engine = engine

    @classmethod
    def for_connection(cls, url: str) -> SqlEraser:
        """The eraser for a connection string, over its cached engine."""
        return cls(engine_for(url))

    async def erase(self, request: StepRequest) -> StepOutcome:
        """Delete, soft-delete or anonymise the subject's rows in one transaction; or retain."""
        step = request.step
        locator = _locator(request)
        if step.action == "retain":
            return retained_outcome(request, "retained by policy")
        if step.action not in ("delete", "soft_delete", "anonymize"):
            raise UnsupportedStep(
                f"step {step.id}: action {step.action!r} does not apply to a SQL table; "
                "use delete, soft_delete, anonymize or retain"
            )
        evidence: Evidence = {
            "table": locator.table,
            "action": step.action,
            "join_hops": len(locator.via),
        }
        async with _database(step.system), self.engine.begin() as conn:
            target = await _target(conn, request)
            evidence["dialect"] = conn.dialect.name
            if step.action == "delete":
                result = await conn.execute(delete(target.table).where(target.match))
                detail = f"deleted the subject's rows from {locator.table}"
            else:
                values: dict[str, object] = dict(target.clear)
                if step.action == "soft_delete":
                    values.update(_soft_delete_value(request, target))
                elif not values:
                    return retained_outcome(
                        request, f"every personal column of {locator.table} is kept"
                    )
                result = await conn.execute(update(target.table).where(target.match).values(values))
                verb = "soft-deleted" if step.action == "soft_delete" else "anonymised"
                detail = (
                    f"{verb} the subject's rows in {locator.table}: cleared "
                    f"{', '.join(target.clear) or 'no column'}"
                    + (f"; kept {', '.join(target.kept)}" if target.kept else "")
                )
            affected = max(result.rowcount, 0)
        evidence.update(
            rows=affected, columns_cleared=len(target.clear), columns_kept=len(target.kept)
        )
        return StepOutcome(
            step_id=step.id, status="running", affected=affected, evidence=evidence, detail=detail
        )

    async def verify(self, request: StepRequest, erased: StepOutcome) -> StepOutcome:
        """Check the erasure held: rows gone, or marked and cleared; `done` or `failed`."""
        step = request.step
        locator = _locator(request)
        if erased.status in ("retained", "failed") or step.action == "retain":
            return erased
        if step.action not in ("delete", "soft_delete", "anonymize"):
            raise UnsupportedStep(f"step {step.id}: action {step.action!r} has nothing to verify")
        async with _database(step.system), self.engine.connect() as conn:
            target = await _target(conn, request)
            checks = _checks(step.action, target)
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
        the data map says, the subject id fits, and (PostgreSQL) the role may do the step."""
        step = request.step
        locator = _locator(request)
        if step.action == "retain":
            return []
        if step.action not in ("delete", "soft_delete", "anonymize"):
            return [f"step {step.id}: action {step.action!r} does not apply to a SQL table"]
        async with _database(step.system), self.engine.connect() as conn:
            try:
                await _target(conn, request)
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


erase, verify, preflight = connector_activities("sql", SqlEraser.for_connection)


# --- the step's target -----------------------------------------------------------------------


def _locator(request: StepRequest) -> SqlTableLocator:
    step = request.step
    if step.kind != "sql" or not isinstance(step.locator, SqlTableLocator):
        raise UnsupportedStep(f"step {step.id} is a {step.kind} step, not a SQL table")
    return step.locator


def _database(system: str) -> AbstractAsyncContextManager[None]:
    """Driver errors as Lethe's, naming the system (never the driver's text)."""
    return translated(f"database of system {system!r}", ChangeRefused)


def _reflect(sync_conn: Connection, names: list[str]) -> dict[str, list[ReflectedColumn] | None]:
    inspector = inspect(sync_conn)
    found: dict[str, list[ReflectedColumn] | None] = {}
    schemas: list[str] | None = None
    for name in names:
        schema, _, bare = name.rpartition(".")
        if schema:
            # SQLite answers an unknown schema with OperationalError, which would read as an outage.
            schemas = schemas if schemas is not None else inspector.get_schema_names()
            if schema not in schemas:
                found[name] = None
                continue
        try:
            found[name] = inspector.get_columns(bare, schema=schema or None)
        except NoSuchTableError:
            found[name] = None
    return found


async def _target(conn: AsyncConnection, request: StepRequest) -> _Target:
    """Reflect the step's tables, check the data map against them, and build the subject match."""
    step, locator = request.step, _locator(request)
    names = list(dict.fromkeys([locator.table, *(hop.table for hop in locator.via)]))
    reflected = await conn.run_sync(_reflect, names)
    metadata = MetaData()
    tables: dict[str, Table] = {}
    for name in names:
        columns = reflected[name]
        if columns is None:
            raise SchemaMismatch(f"system {step.system!r} has no table {name!r}")
        schema, _, bare = name.rpartition(".")
        tables[name] = Table(
            bare,
            metadata,
            *(Column(c["name"], c["type"], nullable=c["nullable"]) for c in columns),
            schema=schema or None,
        )

    def column(table: str, name: str, role: str) -> Column[Any]:
        if name not in tables[table].c:
            raise SchemaMismatch(
                f"system {step.system!r}: table {table!r} has no column {name!r} ({role})"
            )
        found: Column[Any] = tables[table].c[name]
        return found

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
    value = _subject_value(request.subject.subject_id, subject, previous_name, conn.dialect.name)
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
    target = _Target(table=table, match=match, soft_delete=soft_delete, kept=kept)
    if step.action in ("soft_delete", "anonymize"):
        for name, col in personal.items():
            if name in kept or name == locator.soft_delete_column:
                continue
            target.clear[name] = (
                None
                if col.nullable
                else _placeholder(col, locator.columns[name], step.system, locator.table)
            )
    return target


# --- values ----------------------------------------------------------------------------------


def _subject_value(subject_id: str, col: Column[Any], table: str, dialect: str) -> object:
    """The subject id converted to the subject column's type, or SubjectIdDoesNotFit."""
    kind = col.type
    does_not_fit = SubjectIdDoesNotFit(
        f"the subject id does not fit column {col.name!r} of table {table!r} "
        f"(type {_type_name(col)})"
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


def _placeholder(col: Column[Any], category: str, system: str, table: str) -> object:
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
        f"{_type_name(col)}, which has no anonymous placeholder; make it nullable, keep it, or "
        "delete the rows instead"
    )


def _soft_delete_value(request: StepRequest, target: _Target) -> dict[str, object]:
    """The soft-delete column's new value: the first deletion time stays (COALESCE)."""
    locator, col = _locator(request), target.soft_delete
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
        f"{locator.table!r} is of type {_type_name(col)}; Lethe sets a timestamp, date or boolean"
    )


def _checks(action: str, target: _Target) -> list[tuple[str, ColumnElement[bool]]]:
    """Per column, the condition an erased row meets (for delete: none, rows must be gone)."""
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


def _type_name(col: Column[Any]) -> str:
    try:
        return str(col.type)
    except SQLAlchemyError:
        return type(col.type).__name__
