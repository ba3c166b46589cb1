"""`lethe datamap check`: the map's problems with file, line, path and problem, and exit codes;
`--live` on SQLite: date columns that are missing or not dates, scope columns that are missing,
tables that do not exist and databases that cannot be reached, with nothing written."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lethe.classification.datamap import DataMap, load_datamap
from lethe.cli.app import app
from lethe.cli.datamap import Problem, check_live

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "examples" / "datamap.yaml"
VARIABLE = "LETHE_TEST_CLINIC_DB"

runner = CliRunner()

BAD = """\
version: 1
regions: [eu]
tenants:
  acme: {region: eu}
systems:
  - name: bus
    kind: kafka
    region: eu
    connection: BUS
    topics:
      - topic: profiles
        key_template: "p:{subject_id}"
        categories: [user]
        retention: {created: event_time}
  - name: backups
    kind: blob
    region: eu
    connection: BLOBS
    backups:
      - container: exports
        subject_tag: subject_ref
        categories: [user]
        retention:
          created: backup_date
"""


def test_a_sound_map_is_ok_with_its_counts() -> None:
    result = runner.invoke(app, ["datamap", "check", "--datamap", str(SAMPLE)])
    assert result.exit_code == 0, result.output
    assert result.stdout == (f"ok: {SAMPLE}: 5 systems, 8 locators, 6 with retention dates\n")


def test_the_map_comes_from_lethe_datamap_by_default() -> None:
    result = runner.invoke(app, ["datamap", "check", "--json"], env={"LETHE_DATAMAP": str(SAMPLE)})
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["problems"] == [] and report["live"] is None
    assert (report["systems"], report["locators"], report["dated"]) == (5, 8, 6)


def test_each_problem_names_the_file_the_line_the_path_and_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "map.yaml"
    path.write_text(BAD)
    result = runner.invoke(app, ["datamap", "check", "--datamap", str(path)])
    assert result.exit_code == 1, result.output
    assert result.stdout.splitlines() == [
        f"{path}:14: systems[0].topics[0].retention.created: 'event_time' cannot date a Kafka "
        "record: it is dated by its own timestamp, from which Kafka's retention runs, so give "
        "created: timestamp",
        f"{path}:24: systems[1].backups[0].retention.created: 'backup_date' cannot date a "
        "backup blob: it is dated by the storage service's own property, so give created: "
        "creation_time or last_modified",
    ]
    assert result.stderr == f"2 problems in {path}\n"

    as_json = runner.invoke(app, ["datamap", "check", "--datamap", str(path), "--json"])
    assert as_json.exit_code == 1
    report = json.loads(as_json.stdout)
    assert not report["ok"] and report["systems"] is None
    assert [(p["line"], p["path"]) for p in report["problems"]] == [
        (14, "systems[0].topics[0].retention.created"),
        (24, "systems[1].backups[0].retention.created"),
    ]


def test_broken_yaml_is_a_problem_at_its_line(tmp_path: Path) -> None:
    path = tmp_path / "map.yaml"
    path.write_text("version: 1\nsystems: [unclosed\n")
    result = runner.invoke(app, ["datamap", "check", "--datamap", str(path), "--json"])
    assert result.exit_code == 1
    (problem,) = json.loads(result.stdout)["problems"]
    assert problem["path"] == "(top level)" and problem["problem"].startswith("not valid YAML")


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--datamap", "nope.yaml"], "nope.yaml: cannot be read (No such file or directory)"),
        ([], "name the data map: --datamap FILE, or set LETHE_DATAMAP"),
    ],
)
def test_a_map_that_cannot_be_read_exits_2(tmp_path: Path, args: list[str], said: str) -> None:
    result = runner.invoke(app, ["datamap", "check", *args], env={"LETHE_DATAMAP": None})
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == f"error: {said}\n"


CLINIC = """\
version: 1
regions: [eu]
tenants:
  acme: {{region: eu}}
systems:
  - name: clinic-db
    kind: sql
    region: eu
    connection: {variable}
    tables:
      - table: visits
        subject_column: patient_id
        columns: {{notes: user.health_and_medical.encounter}}
        retention:
          created: created_at
          last_activity: seen_at
          closed: closed_on
          scopes: {{tenant: tenant_id}}
      - table: notes
        subject_column: patient_id
        columns: {{body: user.health_and_medical.encounter}}
        retention:
          created: written
          closed: closed_at
          last_activity: untyped
          scopes: {{tenant: tenant_id}}
      - table: archive
        subject_column: patient_id
        columns: {{body: user.health_and_medical.encounter}}
        retention: {{created: created_at}}
      - table: undated
        subject_column: patient_id
        columns: {{body: user.health_and_medical.encounter}}
  - name: bus
    kind: kafka
    region: eu
    connection: BUS
    topics:
      - topic: profiles
        key_template: "p:{{subject_id}}"
        categories: [user]
        retention: {{created: timestamp}}
"""


def _clinic(tmp_path: Path) -> tuple[Path, Path]:
    """A SQLite clinic (visits dated as the map says, notes not) and its data map."""
    database = tmp_path / "clinic.db"
    with sqlite3.connect(database) as conn:
        conn.executescript(
            """
            CREATE TABLE visits (patient_id TEXT, tenant_id TEXT, notes TEXT,
                                 created_at TIMESTAMP, seen_at DATETIME, closed_on DATE);
            CREATE TABLE notes (patient_id TEXT, body TEXT, written TEXT, untyped);
            CREATE TABLE undated (patient_id TEXT, body TEXT);
            INSERT INTO visits VALUES ('p-1', 'acme', 'n', '2026-01-01', NULL, NULL);
            INSERT INTO notes VALUES ('p-1', 'b', 'yesterday', 1);
            """
        )
    conn.close()
    path = tmp_path / "map.yaml"
    path.write_text(CLINIC.format(variable=VARIABLE))
    return database, path


def _dump(database: Path) -> list[str]:
    conn = sqlite3.connect(database)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def _parsed(path: Path) -> tuple[DataMap, yaml.Node | None]:
    return load_datamap(path), yaml.compose(path.read_text(), Loader=yaml.SafeLoader)


async def _live(path: Path) -> tuple[list[tuple[str, str]], list[Problem]]:
    """`check_live` on the map at `path`: (system, status) of each system, and the problems."""
    datamap, tree = _parsed(path)
    systems, problems = await check_live(datamap, path, tree)
    return [(s.system, s.status) for s in systems], problems


async def test_live_names_each_missing_or_undated_column_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database, path = _clinic(tmp_path)
    monkeypatch.setenv(VARIABLE, f"sqlite+aiosqlite:///{database}")
    before = _dump(database)
    systems, problems = await _live(path)
    assert systems == [("clinic-db", "checked"), ("bus", "skipped")]
    found = {(p.line, p.path, p.table, p.column): p.problem for p in problems}
    table = "system 'clinic-db': table"
    assert found == {
        (23, "systems[0].tables[1].retention.created", "notes", "written"): (
            f"{table} 'notes': column 'written' (the created date) is TEXT, not a date or time "
            "type (DATE, TIMESTAMP, DATETIME)"
        ),
        (24, "systems[0].tables[1].retention.closed", "notes", "closed_at"): (
            f"{table} 'notes' has no column 'closed_at' (the closed date)"
        ),
        (25, "systems[0].tables[1].retention.last_activity", "notes", "untyped"): (
            f"{table} 'notes': column 'untyped' (the last_activity date) is declared without a "
            "type, not a date or time type (DATE, TIMESTAMP, DATETIME)"
        ),
        (26, "systems[0].tables[1].retention.scopes.tenant", "notes", "tenant_id"): (
            f"{table} 'notes' has no column 'tenant_id' (the tenant scope)"
        ),
        (27, "systems[0].tables[2].table", "archive", None): f"{table} 'archive' does not exist",
    }
    assert all(p.system == "clinic-db" and p.file == str(path) for p in problems)
    assert _dump(database) == before


async def test_live_skips_a_system_whose_variable_is_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, path = _clinic(tmp_path)
    monkeypatch.delenv(VARIABLE, raising=False)
    systems, problems = await _live(path)
    assert systems == [("clinic-db", "skipped"), ("bus", "skipped")] and problems == []


@pytest.mark.parametrize(
    ("url", "path", "problem"),
    [
        (
            "sqlite+aiosqlite:////no-such-folder/secret-name.db",
            "systems[0]",
            "unreachable: system 'clinic-db' did not answer (OperationalError: OperationalError)",
        ),
        (
            "mysql+nodriver://clinic:secret-name@db/clinic",
            "systems[0].connection",
            f"{VARIABLE}: the connection is not a usable async SQLAlchemy URL",
        ),
    ],
)
async def test_an_unreachable_system_is_named_never_its_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, path: str, problem: str
) -> None:
    _, map_path = _clinic(tmp_path)
    monkeypatch.setenv(VARIABLE, url)
    systems, problems = await _live(map_path)
    assert systems[0] == ("clinic-db", "unreachable")
    (found,) = problems
    assert (found.path, found.line) == (path, 6 if path == "systems[0]" else 9)
    assert found.problem.startswith(problem), found.problem
    assert "secret-name" not in found.model_dump_json()
