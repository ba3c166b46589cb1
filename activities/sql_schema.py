"""The live tables a SQL step uses, as the database describes them, kept for a short time.

Reflecting a table costs several catalog queries; a step's preflight, erase and verify, and the
next steps on the same tables, reuse one description, and the `Table` built from it, for
`TTL_SECONDS`. A description can go stale (a
column dropped after it was read): the statement then fails, and the SQL connector drops the
description and reads the tables afresh, so a stale one is never used to build another statement
(`lethe.activities.sql`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sqlalchemy import Column, MetaData, Table, inspect
from sqlalchemy.engine import Connection
from sqlalchemy.engine.interfaces import ReflectedColumn
from sqlalchemy.exc import NoSuchTableError
from sqlalchemy.ext.asyncio import AsyncConnection

TTL_SECONDS = 30.0
"""How long a table's description is reused."""


@dataclass(frozen=True)
class Reflected:
    """One table as the database describes it."""

    columns: list[ReflectedColumn]
    primary_key: list[str] = field(default_factory=list)
    foreign_keys: set[str] = field(default_factory=set)
    """The columns a foreign key constrains."""
    _tables: dict[str, Table] = field(default_factory=dict, init=False, repr=False, compare=False)

    def table(self, name: str) -> Table:
        """The table `name` (schema-qualified or not) as described, built once: statements on
        the same `Table` hit SQLAlchemy's compiled cache (its cache key is the `Table` itself,
        so a new one per call would compile every statement again)."""
        built = self._tables.get(name)
        if built is None:
            schema, _, bare = name.rpartition(".")
            built = self._tables[name] = Table(
                bare,
                MetaData(),
                *(
                    Column(
                        c["name"],
                        c["type"],
                        nullable=c["nullable"],
                        primary_key=c["name"] in self.primary_key,
                    )
                    for c in self.columns
                ),
                schema=schema or None,
            )
        return built


Tables = dict[str, Reflected | None]
"""Table name -> its description, or None when the database has no such table."""


def reflect(sync_conn: Connection, names: list[str], erased: str) -> Tables:
    """Each table's columns; for the erased table also its primary key and foreign keys."""
    inspector = inspect(sync_conn)
    found: Tables = {}
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
            columns = inspector.get_columns(bare, schema=schema or None)
            if name != erased:
                found[name] = Reflected(columns)
                continue
            primary = inspector.get_pk_constraint(bare, schema=schema or None)
            constrained = {
                column
                for key in inspector.get_foreign_keys(bare, schema=schema or None)
                for column in key["constrained_columns"]
            }
            found[name] = Reflected(
                columns, list(primary.get("constrained_columns") or []), constrained
            )
        except NoSuchTableError:
            found[name] = None
    return found


@dataclass
class SchemaCache:
    """Descriptions of one database's tables, each reused for TTL_SECONDS."""

    ttl_seconds: float = TTL_SECONDS
    reads: int = 0
    """How many times the catalog was read (for tests and benchmarks)."""
    _kept: dict[tuple[tuple[str, ...], str], tuple[float, Tables]] = field(default_factory=dict)

    async def tables(
        self, conn: AsyncConnection, names: list[str], erased: str, *, fresh: bool = False
    ) -> tuple[Tables, bool]:
        """The tables `names` (the erased one with its keys), and whether the description was
        kept (True) or read now (when `fresh`, unknown or older than the TTL)."""
        key = (tuple(names), erased)
        kept = self._kept.get(key)
        if not fresh and kept is not None and time.monotonic() - kept[0] < self.ttl_seconds:
            return kept[1], True
        self.reads += 1
        found = await conn.run_sync(reflect, names, erased)
        self._kept[key] = (time.monotonic(), found)
        return found, False

    def forget(self, names: list[str]) -> None:
        """Drop every kept description that involves one of `names`."""
        for key in [k for k in self._kept if set(k[0]) & set(names)]:
            del self._kept[key]
