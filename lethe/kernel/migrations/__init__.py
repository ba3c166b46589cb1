"""Lethe's own schemas under Alembic: where one stands, bringing it to its head, refusing it.

Each schema (Lethe's store, the key store) has its history of revisions beside its tables and a
version table of its own, so both can live in one database. A database made before migrations
(the schema's tables as its baseline revision makes them, no version table) is recognised and
stamped at the baseline; tables that differ from it are refused, naming the differences, and
nothing is changed. An upgrade runs in one transaction under a lock (an advisory lock on
PostgreSQL, `BEGIN IMMEDIATE` on SQLite), so processes starting together upgrade once.

A baseline revision's module holds `TABLES`, the MetaData it creates, frozen: how a database
made before migrations is recognised. Every later change is a revision of its own.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from pydantic import BaseModel, ConfigDict
from sqlalchemy import Connection, MetaData, func, inspect, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from lethe.kernel.errors import LetheError

UPGRADE_COMMAND = "lethe db upgrade"
"""What an operator runs to bring Lethe's schemas to their heads."""

MigrateMode = Literal["auto", "refuse"]
State = Literal["current", "behind", "empty", "unversioned", "foreign"]
"""Where a schema stands: at its head; at an older revision; no table of it yet; its tables made
before migrations (no revision recorded); tables that are not as Lethe makes them."""

_HERE = Path(__file__).resolve().parent
_alembic = asyncio.Lock()
"""Alembic runs a migration through module-level proxies (`alembic.context`, `alembic.op`), so
one process runs one at a time (taken after the database's lock, so that one is still tried)."""


class SchemaError(LetheError):
    """One of Lethe's own schemas cannot be used as it stands."""


class SchemaBehind(SchemaError):
    """A schema is behind the revision this version of Lethe needs, and may not be upgraded here."""


class ForeignSchema(SchemaError):
    """A database holds tables under Lethe's names that are not as Lethe makes them, or a
    revision this version of Lethe does not know."""


@dataclass(frozen=True, eq=False)
class Schema:
    """One of Lethe's own schemas: its tables now, its revisions, and where it records its own."""

    key: str
    """Its short name, for tools and command-line options: `store`, `keys`."""
    name: str
    """What messages call it: "Lethe's store", "the key store"."""
    tables: MetaData
    versions: Path
    """The folder of its revision modules."""
    version_table: str
    baseline: str
    """Its first revision, whose module's TABLES are the tables made before migrations."""


class SchemaStatus(BaseModel):
    """Where one schema stands against its head."""

    model_config = ConfigDict(frozen=True)

    schema_key: str
    """Which schema, for tools: `store`, `keys`."""
    name: str
    revision: str | None
    head: str
    state: State
    problems: tuple[str, ...] = ()


class Upgraded(BaseModel):
    """What one upgrade did: from which revision (None: no revision recorded) to which."""

    model_config = ConfigDict(frozen=True)

    schema_key: str
    name: str
    from_revision: str | None
    to_revision: str
    adopted: bool
    """The tables were made before migrations and were stamped at the baseline first."""


def _config(schema: Schema, connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_HERE))
    config.set_main_option("path_separator", "os")
    config.set_main_option("version_locations", str(schema.versions))
    config.attributes["connection"] = connection
    config.attributes["version_table"] = schema.version_table
    return config


@lru_cache(maxsize=8)
def _script(schema: Schema) -> ScriptDirectory:
    return ScriptDirectory.from_config(_config(schema))


def head(schema: Schema) -> str:
    """The revision this version of Lethe needs the schema at."""
    found = _script(schema).get_current_head()
    if found is None:
        raise SchemaError(f"{schema.name} has no migrations: this installation of Lethe is broken")
    return found


def baseline_tables(schema: Schema) -> MetaData:
    """The tables the schema's baseline revision makes (as the code before migrations did)."""
    tables: MetaData = _script(schema).get_revision(schema.baseline).module.TABLES
    return tables


def differences(
    connection: Connection,
    tables: MetaData,
    *,
    only: set[str] | None = None,
    ignore: frozenset[str] = frozenset(),
) -> list[str]:
    """How the database differs from `tables`, in words (none: the same). Only the tables
    named in `only` are compared when it is given, else every table not in `ignore`."""

    def include(name: str | None, type_: str, parents: Any) -> bool:
        if type_ != "table":
            return True
        return name in only if only is not None else name not in ignore

    context = MigrationContext.configure(
        connection, opts={"include_name": include, "compare_type": True}
    )
    changes = [
        change
        for diff in compare_metadata(context, tables)
        for change in (diff if isinstance(diff, list) else [diff])
    ]
    # Missing tables, and each table's missing columns, are named together, first.
    missing = [change[1].name for change in changes if change[0] == "add_table"]
    found = [f"{'tables' if len(missing) > 1 else 'table'} missing: {', '.join(missing)}"]
    lacking: dict[str, list[str]] = {}
    for change in changes:
        if change[0] == "add_column":
            lacking.setdefault(change[2], []).append(change[3].name)
    for table, names in lacking.items():
        found.append(
            f"table {table} lacks column{'s' if len(names) > 1 else ''} {', '.join(names)}"
        )
    found += [
        _described(change)
        for change in changes
        if change[0] not in ("add_table", "add_column")
        and not (change[0] in ("add_index", "add_constraint") and change[1].table.name in missing)
    ]
    return found[0 if missing else 1 :]


def _described(change: tuple[Any, ...]) -> str:
    kind = change[0]
    if kind == "remove_table":
        return f"table {change[1].name} is not one Lethe makes"
    if kind == "remove_column":
        return f"column {change[2]}.{change[3].name} is not one Lethe makes"
    if kind == "modify_type":
        return f"column {change[2]}.{change[3]} is {change[5]}, not {change[6]}"
    if kind == "modify_nullable":
        allowed = "allows" if change[5] else "does not allow"
        return f"column {change[2]}.{change[3]} {allowed} NULL, unlike Lethe's"
    if kind in ("add_index", "remove_index", "add_constraint", "remove_constraint"):
        item = change[1]
        what = "index" if kind.endswith("index") else "constraint"
        name = item.name or ", ".join(column.name for column in item.columns)
        state = "is missing" if kind.startswith("add") else "is not one Lethe makes"
        return f"{what} {name} on table {item.table.name} {state}"
    return f"{kind.replace('_', ' ')} on {change[2] if len(change) > 2 else change[1]}"


def _found(
    schema: Schema, revision: str | None, state: State, problems: tuple[str, ...] = ()
) -> SchemaStatus:
    return SchemaStatus(
        schema_key=schema.key,
        name=schema.name,
        revision=revision,
        head=head(schema),
        state=state,
        problems=problems,
    )


def _status(connection: Connection, schema: Schema) -> SchemaStatus:
    target = head(schema)
    names = set(inspect(connection).get_table_names())
    if schema.version_table in names:
        context = MigrationContext.configure(
            connection, opts={"version_table": schema.version_table}
        )
        revision = context.get_current_revision()
        if revision is not None:
            known = {script.revision for script in _script(schema).walk_revisions()}
            if revision not in known:
                problem = f"revision {revision} is not one this version of Lethe knows"
                return _found(schema, revision, "foreign", (problem,))
            state: State = "current" if revision == target else "behind"
            return _found(schema, revision, state)
    baseline = baseline_tables(schema)
    ours = set(baseline.tables) | set(schema.tables.tables)
    if not names & ours:
        return _found(schema, None, "empty")
    problems = tuple(differences(connection, baseline, only=set(baseline.tables)))
    return _found(schema, None, "foreign" if problems else "unversioned", problems)


def _foreign(status: SchemaStatus) -> ForeignSchema:
    if status.revision is not None:
        return ForeignSchema(
            f"{status.name} is at revision {status.revision}, which this version of Lethe does "
            f"not know (its head is {status.head}): a newer Lethe has upgraded it. Run that "
            "version or a later one; nothing was changed."
        )
    shown = "; ".join(status.problems[:8])
    more = f" (and {len(status.problems) - 8} more)" if len(status.problems) > 8 else ""
    return ForeignSchema(
        f"{status.name} holds tables that are not as Lethe makes them, so Lethe will not use "
        f"or migrate it: {shown}{more}. Nothing was changed. Point Lethe at a database of its "
        "own, or restore Lethe's tables as they were."
    )


def _upgrade(connection: Connection, schema: Schema) -> Upgraded:
    found = _status(connection, schema)
    if found.state == "foreign":
        raise _foreign(found)
    config = _config(schema, connection)
    if found.state == "unversioned":
        command.stamp(config, schema.baseline)
    if found.state != "current":
        command.upgrade(config, "head")
    return Upgraded(
        schema_key=schema.key,
        name=schema.name,
        from_revision=found.revision,
        to_revision=found.head,
        adopted=found.state == "unversioned",
    )


async def _lock(connection: AsyncConnection, schema: Schema) -> None:
    """Begin the upgrade's transaction holding the schema's lock until it ends."""
    if connection.dialect.name == "postgresql":
        key = func.hashtextextended(f"lethe.migrations.{schema.version_table}", 0)
        await connection.execute(select(func.pg_advisory_xact_lock(key)))
    elif connection.dialect.name == "sqlite":
        # The driver leaves DDL outside any transaction of its own; this one takes the write
        # lock at once, so a second process waits (busy_timeout) and then finds the head.
        await connection.exec_driver_sql("BEGIN IMMEDIATE")


async def status(engine: AsyncEngine, schema: Schema) -> SchemaStatus:
    """Where the schema stands in the database (reads only)."""
    async with engine.connect() as connection:
        return await connection.run_sync(_status, schema)


async def upgrade(engine: AsyncEngine, schema: Schema) -> Upgraded:
    """Bring the schema to its head: make it in an empty database, stamp tables made before
    migrations at the baseline, then apply every later revision; refuse foreign tables."""
    async with engine.connect() as connection:
        await _lock(connection, schema)
        async with _alembic:
            done = await connection.run_sync(_upgrade, schema)
        await connection.commit()
    return done


async def ensure(engine: AsyncEngine, schema: Schema, mode: MigrateMode) -> SchemaStatus:
    """Make sure the schema is at its head before it is used: upgrade it (`auto`), or refuse
    (`refuse`) with the schema, its revision, the head and the command that upgrades it."""
    found = await status(engine, schema)
    if found.state == "current":
        return found
    if found.state == "foreign":
        raise _foreign(found)
    if mode == "auto":
        done = await upgrade(engine, schema)
        return _found(schema, done.to_revision, "current")
    revision = {
        "empty": "none (no tables yet)",
        "unversioned": "none (tables made before migrations)",
    }.get(found.state, found.revision or "none")
    raise SchemaBehind(
        f"{schema.name} is at revision {revision}, and this version of Lethe needs "
        f"{found.head}. LETHE_DB_MIGRATE=refuse: Lethe does not upgrade it on its own. "
        f"Run `{UPGRADE_COMMAND}` (with this process's settings), then start again."
    )
