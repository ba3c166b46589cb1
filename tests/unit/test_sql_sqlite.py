"""The SQL connector on a SQLite file: the same erasures, checks and refusals as on PostgreSQL."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Date,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    insert,
    inspect,
    select,
)
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.testing import ActivityEnvironment

from lethe.activities.clients import Clients
from lethe.activities.common import SchemaMismatch
from lethe.activities.connectors import Connectors
from lethe.activities.sql import SqlEraser, SubjectIdDoesNotFit
from lethe.classification.datamap import SqlTableLocator
from lethe.contracts import Action, BatchStepRequest, BulkSubject, StepRequest, Subject
from tests.steps import decision, step, step_request

A, B = "p-1", "p-2"
metadata = MetaData()
patients = Table(
    "patients",
    metadata,
    Column("patient_id", String(40), primary_key=True),
    Column("full_name", String(200), nullable=False),
    Column("email", String(200)),
    Column("date_of_birth", Date, nullable=False),
    Column("deleted_at", DateTime),
)
appointments = Table(
    "appointments",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("patient_no", Integer, nullable=False),
    Column("notes", Text),
)
lab_results = Table(
    "lab_results",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("appointment_id", Integer, nullable=False),
    Column("result", Text, nullable=False),
)


@pytest.fixture
async def eraser(tmp_path: Path) -> AsyncIterator[SqlEraser]:
    """An eraser over a fresh SQLite file holding two subjects, on clients of its own (closed
    afterwards, as a worker closes its own)."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'patients.db'}"
    async with Clients() as clients:
        yield await _seeded(SqlEraser.open(clients, url))


async def _seeded(eraser: SqlEraser) -> SqlEraser:
    """`eraser` with the two subjects' rows in its database."""
    async with eraser.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
        await conn.execute(
            insert(patients),
            [
                {
                    "patient_id": A,
                    "full_name": "Ada",
                    "email": "a@x.org",
                    "date_of_birth": date(1984, 3, 9),
                },
                {
                    "patient_id": B,
                    "full_name": "Grace",
                    "email": "g@x.org",
                    "date_of_birth": date(1990, 7, 1),
                },
            ],
        )
        await conn.execute(
            insert(appointments),
            [
                {"id": 1, "patient_no": 1, "notes": "a"},
                {"id": 2, "patient_no": 2, "notes": "b"},
            ],
        )
        await conn.execute(
            insert(lab_results),
            [
                {"id": 10, "appointment_id": 1, "result": "r1"},
                {"id": 11, "appointment_id": 2, "result": "r2"},
            ],
        )
    return eraser


async def rows(engine: AsyncEngine, table: Table) -> list[tuple[Any, ...]]:
    """A table's rows, sorted."""
    async with engine.connect() as conn:
        return sorted(tuple(row) for row in await conn.execute(select(table)))


def request_for(locator: dict[str, object], action: Action, subject_id: str = A) -> StepRequest:
    """A step request for a locator given as the data map writes it."""
    return step_request(
        step(
            SqlTableLocator.model_validate(locator),
            action=action,
            system="clinic-db",
            connection="CLINIC_DB_URL",
            decisions=[decision(action, rule="r")],
        ),
        subject=Subject(tenant="st-mary", subject_id=subject_id),
        subject_ref="ref",
    )


PATIENTS: dict[str, object] = {
    "table": "patients",
    "subject_column": "patient_id",
    "soft_delete_column": "deleted_at",
    "columns": {
        "full_name": "user.name",
        "email": "user.contact.email",
        "date_of_birth": "user.demographic.date_of_birth",
    },
}
LAB_RESULTS: dict[str, object] = {
    "table": "lab_results",
    "subject_column": "patient_no",
    "via": [{"column": "appointment_id", "table": "appointments", "references": "id"}],
    "columns": {"result": "user.health_and_medical.lab_result"},
}


async def test_delete_and_verify(eraser: SqlEraser) -> None:
    request = request_for(PATIENTS, "delete")
    erased = await eraser.erase(request)
    verified = await eraser.verify(request, erased)
    assert (erased.affected, verified.status, erased.evidence["dialect"]) == (1, "done", "sqlite")
    assert [r[0] for r in await rows(eraser.engine, patients)] == [B]


async def test_soft_delete_twice(eraser: SqlEraser) -> None:
    request = request_for(PATIENTS, "soft_delete")
    await eraser.erase(request)
    first = await rows(eraser.engine, patients)
    again = await eraser.erase(request)
    assert (await eraser.verify(request, again)).status == "done"
    assert await rows(eraser.engine, patients) == first
    erased, untouched = first
    assert erased[:4] == (A, "erased", None, date(1900, 1, 1)) and erased[4] is not None
    assert untouched == (B, "Grace", "g@x.org", date(1990, 7, 1), None)


async def test_pseudonymise_through_a_join_on_an_integer_subject_column(eraser: SqlEraser) -> None:
    request = request_for(LAB_RESULTS, "pseudonymize", subject_id="1")
    erased = await eraser.erase(request)
    assert (await eraser.verify(request, erased)).status == "done"
    assert await rows(eraser.engine, lab_results) == [(10, 1, "erased"), (11, 2, "r2")]


async def test_anonymise_through_a_join_unlinks_the_first_hop(eraser: SqlEraser) -> None:
    """lab_results.appointment_id is NOT NULL with no foreign key: a random negative integer
    that no appointment has replaces it, and the result no longer leads to the subject."""
    request = request_for(LAB_RESULTS, "anonymize", subject_id="1")
    erased = await eraser.erase(request)
    verified = await eraser.verify(request, erased)
    assert (erased.affected, verified.status, verified.evidence["rows_linked"]) == (1, "done", 0)
    (first_id, surrogate, result), untouched = await rows(eraser.engine, lab_results)
    assert (first_id, result, untouched) == (10, "erased", (11, 2, "r2"))
    assert surrogate <= -(2**62)  # SQLite integers are 64-bit
    assert (erased.evidence["unlinked_column"], erased.evidence["unlinked_to"]) == (
        "appointment_id",
        "surrogate",
    )


async def test_anonymise_unlinks_the_subject_column_itself(eraser: SqlEraser) -> None:
    request = request_for(PATIENTS, "anonymize")
    erased = await eraser.erase(request)
    assert (await eraser.verify(request, erased)).status == "done"
    anonymous, untouched = await rows(eraser.engine, patients)
    assert anonymous[0].startswith("anon-") and anonymous[1:4] == (
        "erased",
        None,
        date(1900, 1, 1),
    )
    assert anonymous[4] is None  # anonymised, not marked
    assert untouched[0] == B


async def test_a_retry_after_the_commit_reports_the_first_attempts_rows(
    connectors: Connectors, eraser: SqlEraser, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delete whose worker was lost after the commit: the retry finds nothing, and reports
    the rows the first attempt heartbeated before committing instead of 0."""
    url = str(eraser.engine.url)
    monkeypatch.setenv("CLINIC_DB_URL", url)
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, task_queue="lethe-eu")
    beats: list[Any] = []
    env.on_heartbeat = lambda *details: beats.extend(details)
    request = request_for(PATIENTS, "delete")
    first = await env.run(connectors.activity("sql.erase"), request)
    assert (first.affected, [b["rows"] for b in beats]) == (1, [1])
    env.info = dataclasses.replace(env.info, attempt=2, heartbeat_details=list(beats))
    retried = await env.run(connectors.activity("sql.erase"), request)
    assert (retried.status, retried.affected) == ("done", 1)
    assert (retried.evidence["rows_from_attempt"], retried.evidence["rows_changed"]) == (1, 0)
    env.info = dataclasses.replace(env.info, attempt=3, heartbeat_details=[])
    unknown = await env.run(connectors.activity("sql.erase"), request)
    assert (unknown.affected, unknown.evidence["rows_from_attempt"]) == (0, None)


@pytest.mark.parametrize("subject_id", ["1' OR '1'='1", "x; DROP TABLE patients", "%"])
async def test_ids_that_look_like_sql_touch_nothing(eraser: SqlEraser, subject_id: str) -> None:
    before = await rows(eraser.engine, patients)
    erased = await eraser.erase(request_for(PATIENTS, "delete", subject_id=subject_id))
    assert erased.affected == 0
    assert await rows(eraser.engine, patients) == before
    with pytest.raises(SubjectIdDoesNotFit) as raised:
        await eraser.erase(request_for(LAB_RESULTS, "delete", subject_id=subject_id))
    assert "patient_no" in str(raised.value) and subject_id not in str(raised.value)
    async with eraser.engine.connect() as conn:
        names = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
    assert sorted(names) == ["appointments", "lab_results", "patients"]


@pytest.mark.parametrize(
    ("changes", "missing"),
    [
        ({"table": "patient"}, "patient"),
        ({"table": "archive.patients"}, "archive.patients"),
        ({"soft_delete_column": "removed_at"}, "removed_at"),
    ],
)
async def test_missing_names_are_a_schema_mismatch(
    eraser: SqlEraser, changes: dict[str, object], missing: str
) -> None:
    before = await rows(eraser.engine, patients)
    with pytest.raises(SchemaMismatch, match=missing):
        await eraser.erase(request_for({**PATIENTS, **changes}, "soft_delete"))
    assert await rows(eraser.engine, patients) == before


def batch_for(locator: dict[str, object], action: Action, ids: list[str]) -> BatchStepRequest:
    """A batch step request for `ids` (references ref-0, ref-1, ...)."""
    one = request_for(locator, action)
    return BatchStepRequest(
        request_id="bulk-1",
        batch=0,
        step=one.step,
        subjects=[
            BulkSubject(subject_ref=f"ref-{n}", subject=Subject(tenant="st-mary", subject_id=i))
            for n, i in enumerate(ids)
        ],
        erasure_started_at=one.erasure_started_at,
        window_ends_at=one.window_ends_at,
    )


async def test_a_batch_through_a_join_with_an_id_that_does_not_fit(eraser: SqlEraser) -> None:
    """An expanding IN on SQLite: both subjects' lab results go in one statement; an id that
    does not fit the integer subject column fails alone; one without rows is done with 0."""
    batch = batch_for(LAB_RESULTS, "delete", ["1", "abc", "2", "3"])
    outcome = await eraser.erase_batch(batch)
    assert [(o.subject_ref, o.status, o.affected) for o in outcome.outcomes] == [
        ("ref-0", "done", 1),
        ("ref-1", "failed", 0),
        ("ref-2", "done", 1),
        ("ref-3", "done", 0),
    ]
    assert "does not fit" in outcome.outcomes[1].detail
    assert "abc" not in outcome.model_dump_json()
    assert await rows(eraser.engine, lab_results) == []
    assert len(await rows(eraser.engine, appointments)) == 2  # the path is only read


async def test_a_batch_soft_delete_on_sqlite(eraser: SqlEraser) -> None:
    outcome = await eraser.erase_batch(batch_for(PATIENTS, "soft_delete", [A, B, "p-3"]))
    assert [(o.status, o.affected) for o in outcome.outcomes] == [
        ("done", 1),
        ("done", 1),
        ("done", 0),
    ]
    assert outcome.evidence["rows_changed"] == 2
    assert [r[1] for r in await rows(eraser.engine, patients)] == ["erased", "erased"]
