"""Retention dates in the data map: what dates each kind of locator's records, and the refusals,
each naming the file, the line, the path inside the map and the problem."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lethe.classification.datamap import (
    BlobRetentionDates,
    KafkaRetentionDates,
    LogRetentionDates,
    SqlRetentionDates,
    load_datamap,
)
from lethe.kernel.yamlfile import InvalidFile

ROOT = Path(__file__).resolve().parents[2]

MAP = """\
version: 1
regions: [eu]
tenants:
  acme: {{region: eu}}
systems:
  - name: crm
    kind: sql
    region: eu
    connection: CRM_URL
    tables:
      - table: people
        subject_column: id
        columns:
          email: user.contact.email
        retention: {sql}
  - name: bus
    kind: kafka
    region: eu
    connection: BUS
    topics:
      - topic: profiles
        key_template: "p:{{subject_id}}"
        categories: [user]
        retention: {kafka}
  - name: backups
    kind: blob
    region: eu
    connection: BLOBS
    backups:
      - container: exports
        subject_tag: subject_ref
        categories: [user]
        retention: {blob}
  - name: app-logs
    kind: logs
    region: eu
    connection: BLOBS
    logs:
      - container: portal-logs
        fields: {{pid: subject_id}}
        categories: [user]
        retention: {logs}
"""
GOOD = {
    "sql": "{created: created_at, closed: discharged_at, scopes: {tenant: tenant_id}}",
    "kafka": "{created: timestamp}",
    "blob": "{created: creation_time}",
    "logs": "{created: ts, last_activity: meta.seen_at, nulls: delete}",
}
LINE = {"sql": 15, "kafka": 24, "blob": 33, "logs": 42}
PATH = {
    "sql": r"systems\[0\]\.tables\[0\]\.retention",
    "kafka": r"systems\[1\]\.topics\[0\]\.retention",
    "blob": r"systems\[2\]\.backups\[0\]\.retention",
    "logs": r"systems\[3\]\.logs\[0\]\.retention",
}


def _map(tmp_path: Path, **changes: str) -> Path:
    path = tmp_path / "map.yaml"
    path.write_text(MAP.format(**{**GOOD, **changes}))
    return path


def test_each_kind_of_locator_says_what_dates_its_records(tmp_path: Path) -> None:
    placed = load_datamap(_map(tmp_path)).locators()
    dates = {p.system.kind: p.retention for p in placed}
    assert dates["sql"] == SqlRetentionDates(
        created="created_at", closed="discharged_at", scopes={"tenant": "tenant_id"}
    )
    assert dates["sql"].triggers == {"created": "created_at", "closed": "discharged_at"}
    assert dates["sql"].nulls == "report"  # null dates are reported, never deleted by default
    assert dates["kafka"] == KafkaRetentionDates(created="timestamp")
    assert dates["blob"] == BlobRetentionDates(created="creation_time")
    assert dates["logs"] == LogRetentionDates(
        created="ts", last_activity="meta.seen_at", nulls="delete"
    )
    assert [p.path for p in placed] == [
        ("systems", 0, "tables", 0),
        ("systems", 1, "topics", 0),
        ("systems", 2, "backups", 0),
        ("systems", 3, "logs", 0),
    ]


def test_a_blob_may_be_dated_by_its_last_modified_property(tmp_path: Path) -> None:
    placed = load_datamap(_map(tmp_path, blob="{created: last_modified}")).locators()
    assert placed[2].retention == BlobRetentionDates(created="last_modified")


def test_retention_dates_are_optional(tmp_path: Path) -> None:
    path = _map(tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(line for line in lines if "retention:" not in line))
    placed = load_datamap(path).locators()
    assert len(placed) == 4 and all(p.retention is None for p in placed)


def test_the_sample_maps_date_what_their_seeded_tables_can() -> None:
    placed = load_datamap(ROOT / "examples" / "datamap.yaml").locators()
    dates = {(p.system.name, p.path[-1]): p.retention for p in placed}
    assert dates["patients-db", 0] == SqlRetentionDates(created="created_at")
    assert dates["patients-db", 1] == SqlRetentionDates(closed="scheduled_at")
    assert dates["patients-db", 2] is None  # lab_results has no date column of its own
    assert dates["patient-events", 0] == KafkaRetentionDates(created="timestamp")
    assert dates["session-cache", 0] is None  # Redis keys expire by TTL
    assert dates["app-logs", 0] == LogRetentionDates(created="ts")


@pytest.mark.parametrize(
    ("kind", "value", "where", "problem"),
    [
        ("sql", "{deleted: deleted_at}", "", "'deleted' is not a trigger: give the date field for"),
        ("sql", "{}", "", "give the field that dates the records for at least one trigger"),
        ("sql", "{nulls: delete}", "", "at least one trigger: created, last_activity or closed"),
        ("sql", "{created: 'created at'}", ".created", "'created at' is not a SQL column name"),
        (
            "sql",
            "{closed: appointments.ended_at}",
            ".closed",
            "names another table: a date or scope column is a column of the table itself",
        ),
        ("sql", "{created: c, nulls: drop}", ".nulls", "Input should be 'report' or 'delete'"),
        (
            "sql",
            "{created: c, scopes: {tenant: 'tenant id'}}",
            ".scopes.tenant",
            "'tenant id' is not a SQL column name",
        ),
        ("sql", "{created: c, scopes: {Tenant: t}}", ".scopes.Tenant", "is not a scope key"),
        ("logs", "{created: 'ts[0]'}", ".created", "'ts\\[0\\]' is not a field of a JSON record"),
        ("logs", "{created: .ts}", ".created", "'.ts' is not a field of a JSON record"),
        (
            "blob",
            "{created: backup_date}",
            ".created",
            "'backup_date' cannot date a backup blob: .* creation_time or last_modified",
        ),
        (
            "blob",
            "{created: creation_time, closed: last_modified}",
            ".closed",
            "a backup blob has no closed date: it is dated only by created",
        ),
        (
            "blob",
            "{created: creation_time, scopes: {tenant: t}}",
            ".scopes",
            "a backup blob has no fields to scope a rule by",
        ),
        (
            "kafka",
            "{created: event_time}",
            ".created",
            "'event_time' cannot date a Kafka record: .* created: timestamp",
        ),
        (
            "kafka",
            "{created: timestamp, last_activity: timestamp}",
            ".last_activity",
            "a Kafka record has no last_activity date",
        ),
        ("kafka", "{created: timestamp, nulls: delete}", ".nulls", "nulls does not apply"),
    ],
)
def test_bad_dates_name_the_file_the_path_and_the_problem(
    tmp_path: Path, kind: str, value: str, where: str, problem: str
) -> None:
    with pytest.raises(InvalidFile) as caught:
        load_datamap(_map(tmp_path, **{kind: value}))
    message = str(caught.value)
    assert len(message.splitlines()) == 1, message
    pattern = rf"map\.yaml:{LINE[kind]}: {PATH[kind]}{re.escape(where)}[^:]*: .*{problem}"
    assert re.search(pattern, message), message
