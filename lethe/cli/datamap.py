"""`lethe datamap check`: the data map validated before any sweep runs; with `--live`, the date
and scope columns its SQL tables name checked against the databases themselves (read-only)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated, Literal

import typer
import yaml
from pydantic import BaseModel
from sqlalchemy import types
from sqlalchemy.exc import CompileError

from lethe.activities.clients import Clients
from lethe.activities.driver_errors import translated
from lethe.activities.sql_schema import Reflected, Tables, reflect
from lethe.classification.datamap import (
    DataMap,
    RetentionDates,
    SqlSystem,
    SqlTableLocator,
    System,
    load_datamap,
)
from lethe.cli.common import JsonOption
from lethe.kernel.errors import ConfigurationError, LetheError
from lethe.kernel.yamlfile import TOP_LEVEL, InvalidFile, UnreadableFile, dotted, locate

datamap_app = typer.Typer(help="The data map: check it before a sweep runs.", no_args_is_help=True)

DATE_TYPES = (types.Date, types.DateTime)
"""Column types that hold a date: DATE, TIMESTAMP, DATETIME (SQLite: the declared type)."""
MapPath = tuple[str | int, ...]
"""A path inside the map as the file spells it: `("systems", 0, "tables", 2)`."""


class Problem(BaseModel):
    """One thing wrong: the file, the line, the path inside the map, the problem; for a live
    check also the system, table and column it is about."""

    file: str
    line: int | None = None
    path: str = TOP_LEVEL
    problem: str
    system: str | None = None
    table: str | None = None
    column: str | None = None

    def __str__(self) -> str:
        line = f"{self.line}:" if self.line is not None else ""
        return f"{self.file}:{line} {self.path}: {self.problem}"


class LiveSystem(BaseModel):
    """What `--live` did with one system: checked its tables, skipped it (and why), or could not
    reach it."""

    system: str
    status: Literal["checked", "skipped", "unreachable"]
    detail: str


class MapCheck(BaseModel):
    """What `lethe datamap check --json` prints."""

    file: str
    ok: bool
    systems: int | None = None
    locators: int | None = None
    dated: int | None = None
    """How many locators say which fields date their records (`retention:`); the counts are
    None when the map does not load."""
    live: list[LiveSystem] | None = None
    """With `--live`: each system, checked or not; None without it."""
    problems: list[Problem] = []


DatamapOption = Annotated[
    Path | None,
    typer.Option(
        "--datamap",
        envvar="LETHE_DATAMAP",
        help="the data map (YAML)",
        show_default="LETHE_DATAMAP",
    ),
]
LiveOption = Annotated[
    bool,
    typer.Option(
        "--live",
        help="also read the SQL tables (read-only) whose connection variable is set: date "
        "columns must exist and be dates, scope columns must exist",
    ),
]


@datamap_app.command("check")
def check(
    datamap: DatamapOption = None, live: LiveOption = False, as_json: JsonOption = False
) -> None:
    """Validate the data map: each problem with the file, the path inside it and what is wrong.

    Exit code 0 when it is sound, 1 on problems, 2 when the file cannot be read.
    """
    if datamap is None:
        typer.echo("error: name the data map: --datamap FILE, or set LETHE_DATAMAP", err=True)
        raise typer.Exit(2)
    result = MapCheck(file=str(datamap), ok=False)
    try:
        loaded = load_datamap(datamap)
    except UnreadableFile as exc:
        if as_json:
            result.problems = _problems(exc)
            typer.echo(result.model_dump_json(indent=2))
        else:
            typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except InvalidFile as exc:
        result.problems = _problems(exc)
    else:
        placed = loaded.locators()
        result.systems, result.locators = len(loaded.systems), len(placed)
        result.dated = sum(p.retention is not None for p in placed)
        if live:
            tree = yaml.compose(datamap.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
            result.live, result.problems = asyncio.run(check_live(loaded, datamap, tree))
    result.ok = not result.problems
    _report(result, as_json)
    raise typer.Exit(0 if result.ok else 1)


def _report(result: MapCheck, as_json: bool) -> None:
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
        return
    for system in result.live or []:
        typer.echo(f"{system.system}: {system.status} ({system.detail})")
    for problem in result.problems:
        typer.echo(str(problem))
    if result.ok:
        typer.echo(
            f"ok: {result.file}: {_count(result.systems, 'system')}, "
            f"{_count(result.locators, 'locator')}, {result.dated} with retention dates"
        )
    else:
        typer.echo(f"{_count(len(result.problems), 'problem')} in {result.file}", err=True)


def _count(number: int | None, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _problems(error: InvalidFile) -> list[Problem]:
    """The problems `load_datamap` found, as the command reports them."""
    return [
        Problem(file=str(error.file), line=p.line, path=p.path or TOP_LEVEL, problem=p.problem)
        for p in error.problems
    ]


async def check_live(
    datamap: DataMap, file: Path, tree: yaml.Node | None
) -> tuple[list[LiveSystem], list[Problem]]:
    """Read the tables of every SQL system whose connection variable is set and report date
    columns that are missing or not dates and scope columns that are missing. Reads only."""
    systems: list[LiveSystem] = []
    problems: list[Problem] = []
    async with Clients() as clients:
        for index, system in enumerate(datamap.systems):
            status, found = await _check_system(clients, index, system)
            systems.append(status)
            problems.extend(
                Problem(
                    file=str(file),
                    line=locate(tree, path)[1] if tree is not None else None,
                    path=dotted(path),
                    problem=what,
                    system=system.name,
                    table=table,
                    column=column,
                )
                for path, what, table, column in found
            )
    return systems, problems


Found = tuple[MapPath, str, str | None, str | None]
"""A problem a live check found: its path in the map, what it is, the table and the column."""


async def _check_system(
    clients: Clients, index: int, system: System
) -> tuple[LiveSystem, list[Found]]:
    def status(state: Literal["checked", "skipped", "unreachable"], detail: str) -> LiveSystem:
        return LiveSystem(system=system.name, status=state, detail=detail)

    if not isinstance(system, SqlSystem):
        return status("skipped", f"a {system.kind} system: only SQL tables are checked live"), []
    dated = [(n, t, t.retention) for n, t in enumerate(system.tables) if t.retention is not None]
    if not dated:
        return status("skipped", "no table gives retention dates"), []
    url = os.environ.get(system.connection)
    if not url:
        return status("skipped", f"{system.connection} is not set"), []
    try:
        tables = await _reflect(clients, system, url, [t.table for _, t, _ in dated])
    except ConfigurationError as exc:
        what = f"{system.connection}: {exc}"
        return status("unreachable", what), [(("systems", index, "connection"), what, None, None)]
    except LetheError as exc:
        return status("unreachable", str(exc)), [
            (("systems", index), f"unreachable: {exc}", None, None)
        ]
    found: list[Found] = []
    for n, table, retention in dated:
        for where, what, column in _table_problems(
            system.name, table, retention, tables[table.table]
        ):
            found.append((("systems", index, "tables", n, *where), what, table.table, column))
    return status("checked", f"{_count(len(dated), 'table')} with retention dates"), found


async def _reflect(clients: Clients, system: SqlSystem, url: str, names: list[str]) -> Tables:
    """The tables as the database describes them; its errors say only their type (never the
    URL, which can hold a password)."""
    engine = clients.sql_engine(url)
    async with translated(f"system {system.name!r}"), engine.connect() as conn:
        return await conn.run_sync(reflect, names, "")


def _table_problems(
    system: str, locator: SqlTableLocator, retention: RetentionDates, described: Reflected | None
) -> list[tuple[MapPath, str, str | None]]:
    """What is wrong with one table's retention columns: (path below the table, what, column)."""
    table = f"system {system!r}: table {locator.table!r}"
    if described is None:
        return [(("table",), f"{table} does not exist", None)]
    columns = {column["name"]: column for column in described.columns}
    found: list[tuple[MapPath, str, str | None]] = []
    for trigger, name in retention.triggers.items():
        where = ("retention", trigger)
        if name not in columns:
            found.append((where, f"{table} has no column {name!r} (the {trigger} date)", name))
        elif not isinstance(columns[name]["type"], DATE_TYPES):
            declared = _declared(columns[name]["type"])
            found.append(
                (
                    where,
                    f"{table}: column {name!r} (the {trigger} date) is {declared}, not a date or "
                    "time type (DATE, TIMESTAMP, DATETIME)",
                    name,
                )
            )
    for key, name in retention.scopes.items():
        if name not in columns:
            found.append(
                (
                    ("retention", "scopes", key),
                    f"{table} has no column {name!r} (the {key} scope)",
                    name,
                )
            )
    return found


def _declared(kind: types.TypeEngine[object]) -> str:
    if isinstance(kind, types.NullType):
        return "declared without a type"
    try:
        return str(kind)
    except CompileError:
        return type(kind).__name__
