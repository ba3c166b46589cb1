"""The SQL retention sweep: a table's rows past their storage limit, outside every obligation and
hold, deleted, soft-deleted or anonymised in keyset batches.

A row is due when its limit date is before `now - period` and every obligation's date before
`now - its period` (for a DATE column, the whole day). The cutoffs are computed here and compared
inside each statement, so a row updated during a sweep is judged by its date at its batch.

Batches walk the table by (limit date, primary key), ascending, one statement and one
transaction a batch: `DELETE|UPDATE ... WHERE key IN (SELECT key ... ORDER BY date, key LIMIT n)
AND <due> RETURNING date, key` (on PostgreSQL, with a one-column key, `key = ANY(ARRAY(SELECT
...))`, so that the rows are found by the key's index). The cursor is `[date, *key]`.
Rows with no limit date are kept and counted, or with `nulls: delete` swept after the dated ones
in a second walk by key alone, its cursor `[None, *key]`. A deleted row is gone and an updated
one no longer due, so a batch run again from the same cursor removes nothing twice; after its
commit a batch heartbeats its result, which a retry of the same cursor returns as it is.

Holds: a hold on the whole task removes nothing and counts what it keeps; tenant holds are one
more condition of the statement; subject holds need each candidate row's subject id (on the
table, or through the `via` path), judged here by its reference, and the other rows are changed
by primary key in the same transaction. The first batch (and a dry run, which is one call and
touches nothing) also counts the rows kept for a missing date (`undated`) and those of held
tenants (`held`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import (
    Boolean,
    Column,
    ColumnElement,
    Date,
    DateTime,
    Delete,
    FromClause,
    LargeBinary,
    Numeric,
    Select,
    Table,
    Update,
    Uuid,
    and_,
    any_,
    case,
    delete,
    false,
    func,
    literal,
    not_,
    null,
    or_,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from temporalio import activity

from lethe.activities.attempts import heartbeat, last_heartbeat_held
from lethe.activities.common import SchemaMismatch
from lethe.activities.connector import UnsupportedStep
from lethe.activities.driver_errors import SchemaChanged
from lethe.activities.sql import (
    SoftDeleteNotPossible,
    SubjectIdDoesNotFit,
    UnlinkNotPossible,
    database_errors,
    described_column,
    described_tables,
    key_chunks,
    keyed,
    placeholder,
    subject_value,
    table_names,
    type_name,
)
from lethe.activities.sql_schema import SchemaCache, Tables
from lethe.activities.sweeps import SweepHolds, sweep_holds, tenant_field
from lethe.classification.datamap import SqlTableLocator
from lethe.contracts import RetentionAction, ScopeMatch, SweepBatch, SweepResult, SweepTask
from lethe.kernel.config import current_settings
from lethe.kernel.errors import LetheError
from lethe.kernel.subjects import subject_ref

DATE_TYPES = (Date, DateTime)
"""Column types that date a row: DATE, TIMESTAMP, DATETIME (SQLite: the declared type)."""
PARTITION = 5_000
"""Rows fetched at a time when a batch's or a dry run's candidates are judged for subject holds."""
RECORD = "sql.sweep"
"""The kind of a batch's heartbeat, which a retry of the same cursor returns."""
VERBS: dict[RetentionAction, str] = {
    "delete": "deleted",
    "soft_delete": "soft-deleted",
    "anonymize": "anonymised",
}

Row = tuple[Any, ...]
Trigger = Literal["created", "last_activity", "closed"]
Cursor = list[str | int | float | None]
Holder = Callable[[ColumnElement[bool], Sequence[ColumnElement[Any]], int | None], Select[Any]]


class SweepNotPossible(LetheError):
    """The table cannot be swept as the task asks: a date the task needs is not mapped, no
    primary key to walk it by, or no way to clear its rows in place."""


class CursorDoesNotFit(LetheError):
    """A sweep's cursor does not fit the table's primary key (the table changed mid-sweep)."""


@dataclass(frozen=True)
class _Plan:
    """One task on the table as the live database has it: the columns and conditions of a batch."""

    batch: SweepBatch
    locator: SqlTableLocator
    dialect: str
    table: Table
    date: Column[Any]
    """The limit's date column."""
    key: list[Column[Any]]
    dated: ColumnElement[bool]
    """In scope, not yet swept, dated past the limit and every obligation."""
    undated_due: ColumnElement[bool]
    """In scope, not yet swept, no limit date, past every obligation (gone with nulls: delete)."""
    undated: ColumnElement[bool]
    """In scope, not yet swept, kept only for a missing date: the limit's (nulls: report), or
    an obligation's."""
    held_tenant: ColumnElement[bool]
    """A row of a tenant under a hold (false without tenant holds)."""
    free: ColumnElement[bool]
    """Not under a tenant hold."""
    holds: SweepHolds
    values: dict[str, Any]
    """What soft_delete and anonymize set; empty for delete."""
    holder: Holder | None
    """With subject holds: the candidate rows (where, order, limit) as (date, *key, subject id,
    tenant), a row more than once where the join path leads to several subjects."""
    samples: bool
    """Whether the primary key may be shown: no column of it is personal or links a subject."""

    @property
    def task(self) -> SweepTask:
        """The task swept."""
        return self.batch.task

    @property
    def action(self) -> RetentionAction:
        """What the limit does to a due row."""
        assert self.task.limit is not None  # sweep_table runs only tasks with a limit
        return self.task.limit.action or "delete"

    @property
    def due(self) -> ColumnElement[bool]:
        """Every row the task removes, in both walks."""
        if self.task.nulls == "delete":
            return or_(self.dated, self.undated_due)
        return self.dated


async def sweep_table(engine: AsyncEngine, schemas: SchemaCache, batch: SweepBatch) -> SweepResult:
    """One batch of a retention sweep over one table, or (dry run) the counts of the whole task,
    touching nothing. SchemaMismatch when a date column is missing or not a date; nothing is
    touched then."""
    task = batch.task
    locator = task.locator
    if not isinstance(locator, SqlTableLocator):
        raise UnsupportedStep(f"task {task.id} is not a SQL table; the sql sweep does not run it")
    if task.limit is None or task.kept:
        return SweepResult(task_id=task.id, done=True, detail=task.kept or "no storage limit")
    earlier = _earlier(batch)
    holds = sweep_holds(task, batch.holds)
    try:
        async with database_errors(task.system), engine.connect() as conn:
            plan = await _plan(conn, batch, schemas, holds)
            if earlier is not None and await _committed(conn, plan, earlier):
                return SweepResult.model_validate(earlier["result"])
            if holds.whole:
                return await _held_whole(conn, plan)
            if batch.dry_run:
                return await _dry_run(conn, plan)
            result, to, kept = await _batch(conn, plan)
            if result.removed:
                # Told before the commit: a worker lost between the commit and the completion
                # leaves the batch's count to the retry, which finds its range empty.
                # Heartbeats go out asynchronously, so the commit waits (up to
                # CONFIRM_SECONDS) until the server holds this one; it goes ahead either way,
                # and a retry without it says what it may not count.
                told = {
                    "kind": RECORD,
                    "run": batch.run_id,
                    "task": task.id,
                    "from": batch.cursor,
                    "to": to,
                    "kept": kept,
                    "result": result.model_dump(mode="json"),
                }
                heartbeat(told)
                await last_heartbeat_held(told)
            await conn.commit()
    except SchemaChanged:
        schemas.forget(table_names(locator))  # the retry reads the tables again
        raise
    if earlier is None and _retried():
        result = result.model_copy(update={"detail": _unrecorded(plan, result)})
    return result


def _retried() -> bool:
    return activity.in_activity() and activity.info().attempt > 1


def _unrecorded(plan: _Plan, result: SweepResult) -> str:
    """The detail of a retried batch whose earlier attempt sent no record: it may have removed
    rows (at most a batch) before the worker was lost, which no count includes."""
    return (
        f"{result.detail}; an earlier attempt of this batch left no record: up to "
        f"{plan.batch.batch_size} row(s) it may have removed are not counted"
    )


async def _committed(conn: AsyncConnection, plan: _Plan, told: dict[str, Any]) -> bool:
    """Whether an earlier attempt's batch, told before its commit, was committed: its range
    holds no more rows it would remove than the ones it kept for holds (rolled back, the rows
    it removed would all be back)."""
    nulls_walk, after = _decoded(plan, told.get("from"))
    _, upto = _decoded(plan, told.get("to"))
    if upto is None:
        return False
    order = plan.key if nulls_walk else [plan.date, *plan.key]
    within = and_(plan.undated_due if nulls_walk else plan.dated, plan.free)
    within = and_(within, not_(_past(order, upto)))
    if after is not None:
        within = and_(within, _past(order, after))
    (left,) = await _counts(conn, plan, within)
    return left <= int(told.get("kept", 0))


def _earlier(batch: SweepBatch) -> dict[str, Any] | None:
    """What an earlier attempt told of this very batch just before its commit, if anything."""
    if batch.dry_run or not activity.in_activity():
        return None
    details = activity.info().heartbeat_details
    last = details[-1] if details else None
    if not isinstance(last, dict) or last.get("kind") != RECORD:
        return None
    if (last.get("run"), last.get("task"), last.get("from")) != (
        batch.run_id,
        batch.task.id,
        batch.cursor,
    ):
        return None
    return last


# --- one batch -------------------------------------------------------------------------------


async def _batch(conn: AsyncConnection, plan: _Plan) -> tuple[SweepResult, Cursor | None, int]:
    """Remove the next batch of due rows (not committed), with the first batch's counts; and
    where the batch ends and how many rows in it were kept for subject holds."""
    batch, task = plan.batch, plan.task
    nulls_walk, after = _decoded(plan, batch.cursor)
    if nulls_walk and task.nulls != "delete":
        return SweepResult(task_id=task.id, done=True), None, 0
    held = undated = 0
    if batch.cursor is None:
        undated, held = await _counts(conn, plan, plan.undated, and_(plan.due, plan.held_tenant))
    due = and_(plan.undated_due if nulls_walk else plan.dated, plan.free)
    order = plan.key if nulls_walk else [plan.date, *plan.key]
    where = due if after is None else and_(due, _past(order, after))
    size = batch.batch_size
    if plan.holder is None:
        picked = select(*plan.key).where(where).order_by(*order).limit(size)
        removed = [tuple(row) for row in (await conn.execute(_change(plan, picked, due))).all()]
        covered, kept = removed, 0
        # The database may order text keys otherwise than Python, but every returned row is at
        # most the batch's last, and nothing of the batch is left: resuming there skips nothing.
        last = max(removed, key=lambda row: _position(row, nulls_walk)) if removed else None
        more = len(removed) == size or (
            last is not None
            and await _any(conn, plan, and_(due, _past(order, _position(last, nulls_walk))))
        )
    else:
        scanned, keep = await _judged(conn, plan, plan.holder(where, order, size))
        kept = len(keep)
        removed = []
        go = [row[1:] for row in scanned if row not in keep]
        for chunk in [go] if _by_array(plan) and go else key_chunks(go):
            statement = _change(plan, _among(plan, chunk), due)
            removed += [tuple(row) for row in (await conn.execute(statement)).all()]
        last = scanned[-1] if scanned else None
        more = len(scanned) == size
        covered = scanned
    dates = [row[0] for row in covered if row[0] is not None]
    result = SweepResult(
        task_id=task.id,
        removed=len(removed),
        held=held + kept,
        undated=undated,
        first=_iso(min(dates)) if dates else None,
        last=_iso(max(dates)) if dates else None,
        detail=_detail(plan, len(removed), held + kept),
    )
    to = _encoded(_position(last, nulls_walk), nulls_walk) if last is not None else None
    if more and to is not None:
        return result.model_copy(update={"cursor": to}), to, kept
    if not nulls_walk and task.nulls == "delete":
        return result.model_copy(update={"cursor": [None]}), to, kept
    return result.model_copy(update={"done": True}), to, kept


def _change(plan: _Plan, rows: Select[Any] | ColumnElement[bool], due: ColumnElement[bool]) -> Any:
    """The statement removing `rows` (a query of keys, or a condition) that are still due, as
    the database has them now; it returns each row's (date, *key)."""
    match = _in(plan, rows) if isinstance(rows, Select) else rows
    statement: Delete | Update
    if plan.action == "delete":
        statement = delete(plan.table).where(match, due)
    else:
        statement = update(plan.table).where(match, due).values(plan.values)
    return statement.returning(plan.date, *plan.key)


async def _judged(
    conn: AsyncConnection, plan: _Plan, candidates: Select[Any]
) -> tuple[list[Row], set[Row]]:
    """The candidate rows, each (date, *key), in the walk's order, and those a subject hold
    keeps."""
    width = 1 + len(plan.key)
    scanned: dict[Row, None] = {}
    keep: set[Row] = set()
    judged: dict[tuple[str, str | None], bool] = {}
    # SweepHolds.keeps_subject, with the key read once: it reads the settings on every call,
    # which costs more than the rest of a batch of thousands of rows.
    key = current_settings().subject_key_bytes
    held = plan.holds.subjects
    result = await conn.stream(candidates)
    async for rows in result.partitions(PARTITION):
        for row in rows:
            position = tuple(row[:width])
            scanned.setdefault(position)
            subject, tenant = row[width], row[width + 1]
            if subject is None:
                continue
            pair = (str(subject), None if tenant is None else str(tenant))
            if pair not in judged:
                tenants = [pair[1]] if pair[1] is not None else plan.task.tenants
                judged[pair] = any(subject_ref(t, pair[0], key) in held for t in tenants)
            if judged[pair]:
                keep.add(position)
    return list(scanned), keep


# --- counting --------------------------------------------------------------------------------


async def _held_whole(conn: AsyncConnection, plan: _Plan) -> SweepResult:
    """A hold keeps the whole task: count what it keeps and what lacks a date; change nothing."""
    due, undated = await _counts(conn, plan, plan.due, plan.undated)
    ids = ", ".join(plan.holds.whole)
    return SweepResult(
        task_id=plan.task.id,
        held=due,
        undated=undated,
        done=True,
        detail=f"legal hold(s) {ids} keep every row of {plan.locator.table}: {due} due row(s) kept",
    )


async def _dry_run(conn: AsyncConnection, plan: _Plan) -> SweepResult:
    """What the whole task would remove, keep for holds and keep for a missing date, with a few
    sample keys where they are no personal data; touching nothing."""
    free = and_(plan.due, plan.free)
    removable, held, undated = await _counts(
        conn, plan, free, and_(plan.due, plan.held_tenant), plan.undated
    )
    wanted = plan.batch.samples if plan.samples else 0
    samples: list[Row] = []
    if plan.holder is not None:
        scanned, keep = await _judged(conn, plan, plan.holder(free, [plan.date, *plan.key], None))
        removable, held = removable - len(keep), held + len(keep)
        samples = [row[1:] for row in scanned if row not in keep][:wanted]
    elif wanted:
        query = select(*plan.key).where(free).order_by(plan.date, *plan.key).limit(wanted)
        samples = [tuple(row) for row in (await conn.execute(query)).all()]
    verb = VERBS[plan.action]
    return SweepResult(
        task_id=plan.task.id,
        removed=removable,
        held=held,
        undated=undated,
        done=True,
        samples=[_sample(key) for key in samples],
        detail=f"dry run: {removable} row(s) of {plan.locator.table} would be {verb}, "
        f"{held} kept for legal holds, {undated} kept for a missing date",
    )


async def _counts(
    conn: AsyncConnection, plan: _Plan, *conditions: ColumnElement[bool]
) -> list[int]:
    """How many rows of the table meet each condition, in one scan."""
    sums = [func.coalesce(func.sum(case((condition, 1), else_=0)), 0) for condition in conditions]
    row = (await conn.execute(select(*sums).select_from(plan.table))).one()
    return [int(value) for value in row]


async def _any(conn: AsyncConnection, plan: _Plan, where: ColumnElement[bool]) -> bool:
    """Whether some row of the table meets `where`."""
    query = select(literal(1)).select_from(plan.table).where(where).limit(1)
    return (await conn.execute(query)).first() is not None


def _detail(plan: _Plan, removed: int, held: int) -> str:
    assert plan.task.limit is not None
    detail = (
        f"{VERBS[plan.action]} {removed} row(s) of {plan.locator.table} past {plan.task.limit.rule}"
    )
    return detail + (f"; {held} due row(s) kept for legal holds" if held else "")


# --- the keyset ------------------------------------------------------------------------------


def _in(plan: _Plan, picked: Select[Any]) -> ColumnElement[bool]:
    """True for the rows whose key `picked` selects."""
    if _by_array(plan):
        # `IN (SELECT ...)` lets PostgreSQL's planner hash-join a scan of the whole table; an
        # array makes it find the batch first, then each row by the primary key.
        return plan.key[0] == any_(func.array(picked.scalar_subquery()))
    if len(plan.key) == 1:
        return plan.key[0].in_(picked)
    return tuple_(*plan.key).in_(picked)


def _among(plan: _Plan, keys: Sequence[Row]) -> ColumnElement[bool]:
    """True for the rows whose key is one of `keys` (at most KEY_CHUNK, but on PostgreSQL with
    a one-column key)."""
    if _by_array(plan):
        col = plan.key[0]
        return col == any_(literal([key[0] for key in keys], ARRAY(col.type)))
    return keyed(plan.key, keys)


def _by_array(plan: _Plan) -> bool:
    return plan.dialect == "postgresql" and len(plan.key) == 1


def _past(order: Sequence[Column[Any]], after: Row) -> ColumnElement[bool]:
    """Rows after `after` in the walk's order."""
    values = [literal(value, col.type) for col, value in zip(order, after, strict=True)]
    if len(order) == 1:
        return order[0] > values[0]
    return tuple_(*order) > tuple_(*values)


def _position(row: Row, nulls_walk: bool) -> Row:
    """Where a returned (date, *key) row stands in its walk."""
    return row[1:] if nulls_walk else row


def _encoded(position: Row, nulls_walk: bool) -> Cursor:
    values = [_plain(value) for value in position]
    return [None, *values] if nulls_walk else values


def _decoded(plan: _Plan, cursor: Cursor | None) -> tuple[bool, Row | None]:
    """(whether the cursor is in the walk of undated rows, the position after which it goes on)."""
    if cursor is None:
        return False, None
    problem = CursorDoesNotFit(
        f"task {plan.task.id}: the sweep's cursor does not fit the primary key of table "
        f"{plan.locator.table!r} ({', '.join(col.name for col in plan.key)}); start the sweep again"
    )
    if not cursor:
        raise problem
    nulls_walk = cursor[0] is None
    columns = plan.key if nulls_walk else [plan.date, *plan.key]
    values = cursor[1:] if nulls_walk else cursor
    if nulls_walk and not values:
        return True, None
    if len(values) != len(columns):
        raise problem
    try:
        return nulls_walk, tuple(_value(raw, col) for raw, col in zip(values, columns, strict=True))
    except (TypeError, ValueError, ArithmeticError):
        raise problem from None


def _plain(value: object) -> str | int | float | None:
    """A key or date value as JSON carries it."""
    if value is None or isinstance(value, int | float | str):
        return value
    if isinstance(value, date):  # datetime too
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _value(raw: str | int | float | None, col: Column[Any]) -> object:
    """A cursor's value back as the column's type takes it."""
    kind = col.type
    if raw is None:
        return None
    if isinstance(kind, DateTime):
        return datetime.fromisoformat(str(raw))
    if isinstance(kind, Date):
        return date.fromisoformat(str(raw))
    if isinstance(kind, Uuid):
        return uuid.UUID(str(raw)) if kind.as_uuid else str(raw)
    if isinstance(kind, LargeBinary):
        return bytes.fromhex(str(raw))
    if isinstance(kind, Numeric) and kind.asdecimal:
        return Decimal(str(raw))
    return raw


def _iso(value: object) -> str:
    return value.isoformat() if isinstance(value, date) else str(value)


def _sample(key: Row) -> str:
    plain = [_plain(value) for value in key]
    return str(plain[0]) if len(plain) == 1 else json.dumps(plain)


# --- the plan --------------------------------------------------------------------------------


async def _plan(
    conn: AsyncConnection, batch: SweepBatch, schemas: SchemaCache, holds: SweepHolds
) -> _Plan:
    """The task on the table's description (kept, or read again when the kept one does not
    match the data map)."""
    locator = batch.task.locator
    assert isinstance(locator, SqlTableLocator)
    names = table_names(locator)
    reflected, kept = await schemas.tables(conn, names, locator.table)
    if kept:
        try:
            return _plan_of(batch, reflected, conn.dialect.name, holds)
        except SchemaMismatch:
            pass  # maybe stale: checked against the tables read afresh
        reflected, _ = await schemas.tables(conn, names, locator.table, fresh=True)
    return _plan_of(batch, reflected, conn.dialect.name, holds)


class _Tables:
    """The task's tables as described, and their columns, each checked by name and role."""

    def __init__(self, task: SweepTask, locator: SqlTableLocator, reflected: Tables) -> None:
        self.task, self.locator = task, locator
        self.tables = described_tables(task.system, table_names(locator), reflected)
        self.table = self.tables[locator.table]

    def column(self, name: str, role: str, table: str | None = None) -> Column[Any]:
        """A column of the swept table (or of `table`), or SchemaMismatch naming it."""
        return described_column(
            self.task.system, self.tables[table or self.locator.table], name, role
        )

    def dated(self, trigger: Trigger) -> Column[Any]:
        """The column dating the rows for `trigger`; SchemaMismatch when it is missing or not a
        date."""
        name = self.task.dates.get(trigger)
        if name is None:
            raise SweepNotPossible(
                f"task {self.task.id}: the data map gives table {self.locator.table!r} no "
                f"{trigger} date, so nothing can be judged due"
            )
        col = self.column(name, f"the {trigger} date")
        if not isinstance(col.type, DATE_TYPES):
            raise SchemaMismatch(
                f"system {self.task.system!r}: column {name!r} of table {self.locator.table!r} "
                f"(the {trigger} date) is {type_name(col)}, not a date or time type (DATE, "
                "TIMESTAMP, DATETIME)"
            )
        return col


class _Path:
    """Where a field is: on the swept table, or (a `via` table's tenant column) at the end of
    the join path, reached by nested `IN` subqueries as the erasure does."""

    def __init__(self, tables: _Tables) -> None:
        locator = tables.locator
        self.tables, self.locator = tables, locator
        self.hops: list[tuple[ColumnElement[Any], ColumnElement[Any]]] = []
        previous: FromClause = tables.table
        previous_name = locator.table
        for index, hop in enumerate(locator.via, 1):
            tables.column(hop.column, f"the join column of hop {index}", previous_name)
            tables.column(hop.references, f"the column hop {index} references", hop.table)
            joined = tables.tables[hop.table].alias(f"lethe_path_{index}")
            self.hops.append((previous.c[hop.column], joined.c[hop.references]))
            previous, previous_name = joined, hop.table
        self.last, self.last_name = previous, previous_name
        retention = locator.retention
        self.own = set(retention.scopes.values()) if retention else set()

    def far(self, field: str) -> bool:
        """Whether `field` is on the last table of the join path, not on the swept table."""
        return bool(self.hops) and field == self.locator.tenant_column and field not in self.own

    def column(self, field: str, role: str) -> Column[Any]:
        """The column holding `field` (its table's, not the path's alias)."""
        if self.far(field):
            return self.tables.column(field, role, self.last_name)
        return self.tables.column(field, role)

    def on(
        self,
        field: str,
        role: str,
        test: Callable[[ColumnElement[Any]], ColumnElement[bool]],
        *,
        negate: bool = False,
    ) -> ColumnElement[bool]:
        """True for the swept table's rows whose `field` passes `test` (fails it, `negate`; a
        row the join path leads nowhere fails every test)."""
        self.column(field, role)
        if not self.far(field):
            col = self.tables.table.c[field]
            return or_(col.is_(None), not_(test(col))) if negate else test(col)
        match = test(self.last.c[field])
        for outer, inner in reversed(self.hops):
            match = outer.in_(select(inner).where(inner.is_not(None), match))
        return or_(self.hops[0][0].is_(None), not_(match)) if negate else match


def _plan_of(batch: SweepBatch, reflected: Tables, dialect: str, holds: SweepHolds) -> _Plan:
    """The task on tables as `reflected` describes them; SchemaMismatch naming what the data map
    names and they lack, or a date column that is not a date."""
    task, limit = batch.task, batch.task.limit
    locator = task.locator
    assert isinstance(locator, SqlTableLocator) and limit is not None
    tables = _Tables(task, locator, reflected)
    table = tables.table
    date_col = tables.dated(limit.trigger)
    obligations = [(tables.dated(term.trigger), term.period) for term in task.obligations]
    path = _Path(tables)
    key = list(table.primary_key.columns)
    if not key:
        raise SweepNotPossible(
            f"system {task.system!r}: table {locator.table!r} has no primary key, which a sweep "
            "walks it by; add one"
        )
    now = batch.now if batch.now.tzinfo else batch.now.replace(tzinfo=UTC)
    scope = and_(true(), *(_scope(path, match, dialect) for match in task.scope))
    dates = {date_col.name, *(col.name for col, _ in obligations)}
    values, pending = _action(task, tables, now, dialect, dates)
    base = and_(scope, pending)
    past = date_col < _cutoff(date_col, now - limit.period, dialect)
    ended = and_(
        true(), *(col < _cutoff(col, now - period, dialect) for col, period in obligations)
    )
    known = and_(true(), *(col.is_not(None) for col, _ in obligations))
    reached = or_(past, date_col.is_(None)) if task.nulls == "delete" else past
    kept_null = date_col.is_(None) if task.nulls == "report" else false()
    held_tenant: ColumnElement[bool] = false()
    free: ColumnElement[bool] = true()
    field = tenant_field(task)
    if holds.tenants and field is not None:
        fits = _fitting(sorted(holds.tenants), path.column(field, "the tenant column"), dialect)
        if fits:
            held_tenant = path.on(field, "the tenant column", lambda col: col.in_(fits))
            free = path.on(field, "the tenant column", lambda col: col.in_(fits), negate=True)
    personal = {locator.subject_column, locator.tenant_column, field, *locator.columns}
    if locator.via:
        personal.add(locator.via[0].column)
    return _Plan(
        batch=batch,
        locator=locator,
        dialect=dialect,
        table=table,
        date=date_col,
        key=key,
        dated=and_(base, past, ended),
        undated_due=and_(base, date_col.is_(None), ended),
        undated=and_(base, or_(kept_null, and_(reached, not_(known)))),
        held_tenant=held_tenant,
        free=free,
        holds=holds,
        values=values,
        holder=_holder(tables, path, date_col, key, field) if holds.subjects else None,
        samples=not any(col.name in personal for col in key),
    )


def _scope(path: _Path, match: ScopeMatch, dialect: str) -> ColumnElement[bool]:
    """The rows a scope match covers: `values` -> one of them; `others` -> a value, none of
    them; `null` -> no value."""
    role = f"the {match.key} scope"
    col = path.column(match.field, role)
    listed = _fitting(match.values or match.others, col, dialect)

    def one_of(col: ColumnElement[Any]) -> ColumnElement[bool]:
        return col.in_(listed) if listed else false()

    def valued(col: ColumnElement[Any]) -> ColumnElement[bool]:
        return col.is_not(None)

    if match.values:
        return path.on(match.field, role, one_of)
    if match.others:
        return and_(
            path.on(match.field, role, valued), path.on(match.field, role, one_of, negate=True)
        )
    if match.null:
        return path.on(match.field, role, valued, negate=True)
    return path.on(match.field, role, valued)


def _fitting(values: Sequence[str], col: Column[Any], dialect: str) -> list[object]:
    """`values` in the column's type; a value that cannot be one matches no row, so it goes."""
    fitting: list[object] = []
    for value in values:
        try:
            fitting.append(subject_value(value, col, "", dialect))
        except SubjectIdDoesNotFit:
            continue
    return fitting


def _cutoff(col: Column[Any], moment: datetime, dialect: str) -> object:
    """`moment` as the column compares: aware for a zoned timestamp, else naive UTC; for a DATE
    the day itself, so a row dated on it is past only once the whole day is."""
    kind = col.type
    if isinstance(kind, DateTime):
        if kind.timezone and dialect != "sqlite":
            return moment
        return moment.astimezone(UTC).replace(tzinfo=None)
    return moment.astimezone(UTC).date()


def _action(
    task: SweepTask, tables: _Tables, now: datetime, dialect: str, dates: set[str]
) -> tuple[dict[str, Any], ColumnElement[bool]]:
    """What the limit's action sets, and the condition of a row not yet in that state."""
    assert task.limit is not None
    action = task.limit.action or "delete"
    locator, system = tables.locator, task.system
    if action == "delete":
        return {}, true()
    if action == "soft_delete":
        if locator.soft_delete_column is None:
            raise SoftDeleteNotPossible(
                f"task {task.id}: table {locator.table!r} has no soft_delete_column in the data "
                "map, which soft_delete needs"
            )
        col = tables.column(locator.soft_delete_column, "the soft-delete column")
        return _marked(task, col, now, dialect)
    # anonymize: personal columns cleared, the link to the subject set to NULL.
    link_name = locator.via[0].column if locator.via else locator.subject_column
    role = "the join column of hop 1" if locator.via else "the subject column"
    link = tables.column(link_name, role)
    where = f"system {system!r}: column {link_name!r} of table {locator.table!r} ({role})"
    if locator.unlink == "surrogate" or not link.nullable:
        raise UnlinkNotPossible(
            f"{where}: a retention sweep unlinks rows by setting the link to NULL, and this "
            "column is NOT NULL or mapped `unlink: surrogate`; delete the rows instead, or make "
            "the column nullable"
        )
    keys = {col.name for col in tables.table.primary_key.columns}
    clear: dict[str, Any] = {}
    for name, category in locator.columns.items():
        col = tables.column(name, "a personal column")
        if name == link_name or name in dates:
            continue  # unlinked below; the dates stay, the sweep walks by them
        if name in keys:
            raise SweepNotPossible(
                f"system {system!r}: column {name!r} of table {locator.table!r} is personal and "
                "part of the primary key, which anonymize cannot clear; delete the rows instead"
            )
        clear[name] = None if col.nullable else placeholder(col, category, system, locator.table)
    cleared = [
        tables.table.c[name].is_(None)
        if value is None
        else or_(tables.table.c[name].is_(None), tables.table.c[name] == value)
        for name, value in clear.items()
    ]
    return {**clear, link_name: None}, not_(and_(link.is_(None), *cleared))


def _marked(
    task: SweepTask, col: Column[Any], now: datetime, dialect: str
) -> tuple[dict[str, Any], ColumnElement[bool]]:
    """soft_delete's mark (the sweep's time, its day, or true) and the condition of an unmarked
    row: a row already marked is not due again, and keeps its first mark."""
    kind = col.type
    if isinstance(kind, DateTime | Date):
        return {col.name: _cutoff(col, now, dialect)}, col.is_(None)
    if isinstance(kind, Boolean):
        return {col.name: True}, or_(col.is_(None), col.is_(False))
    raise SoftDeleteNotPossible(
        f"system {task.system!r}: soft-delete column {col.name!r} is of type {type_name(col)}; "
        "Lethe sets a timestamp, date or boolean"
    )


def _holder(
    tables: _Tables, path: _Path, date_col: Column[Any], key: list[Column[Any]], field: str | None
) -> Holder:
    """How a batch finds each candidate row's subject id and tenant (the tenant column beside
    the subject, else the tenant scope's, else none): outer joins along the `via` path from the
    candidates, which are chosen (and limited) first."""
    locator, table = tables.locator, tables.table
    tenant = locator.tenant_column or field
    tables.column(locator.subject_column, "the subject column", path.last_name)
    if tenant is not None:
        path.column(tenant, "the tenant column")
    near_tenant = tenant is not None and not path.far(tenant)

    def holder(
        where: ColumnElement[bool], order: Sequence[ColumnElement[Any]], limit: int | None
    ) -> Select[Any]:
        columns: list[ColumnElement[Any]] = [
            date_col.label("lethe_date"),
            *(col.label(f"lethe_key_{index}") for index, col in enumerate(key)),
        ]
        if locator.via:
            columns.append(table.c[locator.via[0].column].label("lethe_link"))
        else:
            columns.append(table.c[locator.subject_column].label("lethe_subject"))
        if near_tenant:
            assert tenant is not None
            columns.append(table.c[tenant].label("lethe_tenant"))
        chosen = select(*columns).where(where).order_by(*order)
        candidates = (chosen if limit is None else chosen.limit(limit)).subquery("lethe_chosen")
        position = list(candidates.c)[: 1 + len(key)]
        tenant_of: ColumnElement[Any] = candidates.c.lethe_tenant if near_tenant else null()
        if not locator.via:
            found = select(*position, candidates.c.lethe_subject, tenant_of)
            return found.order_by(*position)
        joined: FromClause = candidates
        previous: ColumnElement[Any] = candidates.c.lethe_link
        last: FromClause = candidates
        for index, hop in enumerate(locator.via, 1):
            last = tables.tables[hop.table].alias(f"lethe_hold_{index}")
            joined = joined.outerjoin(last, previous == last.c[hop.references])
            if index < len(locator.via):
                previous = last.c[locator.via[index].column]
        if tenant is not None and not near_tenant:
            tenant_of = last.c[tenant]
        found = select(*position, last.c[locator.subject_column], tenant_of).select_from(joined)
        return found.order_by(*position)

    return holder
