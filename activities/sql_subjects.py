"""Tenant offboarding in a SQL table: a tenant's subjects, one keyset page at a time.

One statement a page, reading only: the distinct values of the subject column among the tenant's
rows, in the column's own order, after the previous page's last id (`after`), at most `limit`.
The tenant's rows are those whose `tenant_column` holds the tenant; a table without one is in a
system that holds only that tenant (the data map refuses a table without a tenant column in a
system of several tenants, and the planner sends a tenant's steps only to the systems holding
it), so every row is the tenant's. A table found through `via` is joined along the path as the
SQL connector joins it (`lethe.activities.sql`), the subject (and tenant) column on its last
table.

Identities come from the columns the locator maps (`identities`): for each, the least non-blank
value among the subject's rows (deterministic from page to page, where "the first row" would
depend on the plan). Subject ids come back as strings and `after` is converted back to the
column's type, so integer and UUID ids page in their own order. An id or identity that a
`Subject` cannot hold (longer than it allows, unprintable) is left out and counted in the log,
never shown; a page may then hold fewer subjects than `limit`, or none, and still have a next.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    Column,
    ColumnElement,
    Enum,
    FromClause,
    Select,
    String,
    Table,
    Text,
    case,
    cast,
    func,
    select,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from lethe.activities.clients import Clients
from lethe.activities.common import SchemaMismatch
from lethe.activities.connector import UnsupportedStep
from lethe.activities.driver_errors import DriverRefused, translated, undefined_name
from lethe.activities.sql import described_column, described_tables, subject_value, table_names
from lethe.activities.sql_schema import SchemaCache, Tables
from lethe.activities.subject_pages import check_tenant, found_subject, log_left_out
from lethe.classification.datamap import SqlTableLocator
from lethe.contracts import Subject, SubjectsPage, SubjectsQuery
from lethe.kernel.config import connection
from lethe.kernel.errors import LetheError


class UnusableSubjectColumn(LetheError):
    """The subject column holds values that are no subject id (binary data, dates, ...)."""


async def sql_subjects(clients: Clients, query: SubjectsQuery) -> SubjectsPage:
    """One page of the distinct subjects of `query.tenant` in the step's table, with the
    identities the locator maps; one statement, reading only."""
    locator = _locator(query)
    check_tenant(query.tenant)
    url = connection(query.step.connection).get_secret_value()
    engine, schemas = clients.sql_engine(url), clients.sql_schemas(url)
    what = f"database of system {query.step.system!r}"
    async with translated(what, DriverRefused, schema_changes=True), engine.connect() as conn:
        # A read-only transaction on PostgreSQL: the database itself refuses any write.
        conn = await conn.execution_options(postgresql_readonly=True)
        rows = await _rows(conn, schemas, query, locator)
    return _page(query, locator, rows)


def _locator(query: SubjectsQuery) -> SqlTableLocator:
    step = query.step
    if step.kind != "sql" or not isinstance(step.locator, SqlTableLocator):
        raise UnsupportedStep(
            f"step {step.id} is a {step.kind} step; SQL subjects are read from sql steps only"
        )
    return step.locator


async def _rows(
    conn: AsyncConnection, schemas: SchemaCache, query: SubjectsQuery, locator: SqlTableLocator
) -> Sequence[Any]:
    """The page's rows, on the tables as described; a kept description that no longer matches
    the database is read again before a mismatch counts."""
    names = table_names(locator)
    reflected, kept = await schemas.tables(conn, names, locator.table)
    if kept:
        try:
            return await _read(conn, query, locator, reflected)
        except SchemaMismatch:
            pass
        except DBAPIError as exc:
            if not undefined_name(exc):
                raise
            await conn.rollback()
        reflected, _ = await schemas.tables(conn, names, locator.table, fresh=True)
    return await _read(conn, query, locator, reflected)


async def _read(
    conn: AsyncConnection, query: SubjectsQuery, locator: SqlTableLocator, reflected: Tables
) -> Sequence[Any]:
    statement = subjects_statement(query, locator, reflected, conn.dialect.name)
    rows: Sequence[Any] = (await conn.execute(statement)).all()
    return rows


def subjects_statement(
    query: SubjectsQuery, locator: SqlTableLocator, reflected: Tables, dialect: str
) -> Select[Any]:
    """The page's query: subject id, then each mapped identity, one row per subject, in id
    order after `query.after`, `limit + 1` rows (the last tells that there is a next page)."""
    system = query.step.system
    tables = described_tables(system, table_names(locator), reflected)

    def column(table: str, name: str, role: str) -> Column[Any]:
        return described_column(system, tables[table], name, role)

    identities = [
        _identity(column(locator.table, name, f"the column of identity {identity!r}"))
        for identity, name in locator.identities.items()
    ]
    source, last, last_name = _path(locator, tables, column)
    described = column(last_name, locator.subject_column, "the subject column")
    subject = last.c[locator.subject_column]
    where: list[ColumnElement[bool]] = [subject.is_not(None)]
    if locator.tenant_column is not None:
        column(last_name, locator.tenant_column, "the tenant column")
        where.append(last.c[locator.tenant_column] == query.tenant)
    if query.after is not None:
        where.append(subject > subject_value(query.after, described, last_name, dialect))
    return (
        select(subject, *identities)
        .select_from(source)
        .where(*where)
        .group_by(subject)
        .order_by(subject)
        .limit(query.limit + 1)
    )


def _path(
    locator: SqlTableLocator,
    tables: dict[str, Table],
    column: Callable[[str, str, str], Column[Any]],
) -> tuple[FromClause, FromClause, str]:
    """The table joined along its `via` path, the path's last table (the subject column's) and
    its name; each hop's columns checked (`column` raises SchemaMismatch naming a missing one)."""
    source: FromClause = tables[locator.table]
    last, last_name = source, locator.table
    for index, hop in enumerate(locator.via, 1):
        column(last_name, hop.column, f"the join column of hop {index}")
        column(hop.table, hop.references, f"the column hop {index} references")
        # Aliased as the connector does, so a path passing a table twice joins the right rows.
        joined = tables[hop.table].alias(f"lethe_path_{index}")
        source = source.join(joined, last.c[hop.column] == joined.c[hop.references])
        last, last_name = joined, hop.table
    return source, last, last_name


def _identity(col: Column[Any]) -> ColumnElement[Any]:
    """The least non-blank value of an identity column among a subject's rows, as text."""
    text = isinstance(col.type, String) and not isinstance(col.type, Enum)
    value: ColumnElement[Any] = col if text else cast(col, Text)
    return func.min(case((func.trim(value) != "", value)))


def _page(query: SubjectsQuery, locator: SqlTableLocator, rows: Sequence[Any]) -> SubjectsPage:
    names = list(locator.identities)
    taken = rows[: query.limit]
    subjects: list[Subject] = []
    for row in taken:
        identities = dict(zip(names, row[1:], strict=True))
        found = found_subject(query.tenant, _text_id(query, locator, row[0]), identities)
        if found is not None:
            subjects.append(found)
    log_left_out(query.step.system, f"table {locator.table}", len(taken) - len(subjects))
    more = len(rows) > query.limit
    return SubjectsPage(
        subjects=subjects,
        next_after=_text_id(query, locator, taken[-1][0]) if more else None,
    )


def _text_id(query: SubjectsQuery, locator: SqlTableLocator, value: object) -> str:
    """A subject column's value as the subject id it is."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float | Decimal | uuid.UUID) and not isinstance(value, bool):
        return str(value)
    raise UnusableSubjectColumn(
        f"system {query.step.system!r}: the subject column of table {locator.table!r} holds "
        f"{type(value).__name__} values, which are no subject ids"
    )
