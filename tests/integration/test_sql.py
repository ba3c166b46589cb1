"""The SQL connector against the stack's PostgreSQL: each action, join paths, bad input.

Every test gets its own schema holding a small hospital (patients, appointments, lab results and
comments on them) with two subjects, and checks with SQLAlchemy that one subject's data is gone,
cleared, or no longer linked to them, while the other's is untouched.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.schema import AddConstraint, CreateSchema, DropSchema
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from lethe.activities.clients import Clients
from lethe.activities.common import SchemaMismatch
from lethe.activities.connector import UnsupportedStep
from lethe.activities.connectors import Connectors
from lethe.activities.sql import (
    ChangeRefused,
    NoPlaceholder,
    RowsChanged,
    SoftDeleteNotPossible,
    SqlEraser,
    SubjectIdDoesNotFit,
    UnlinkNotPossible,
)
from lethe.classification.datamap import SqlTableLocator
from lethe.contracts import Action, StepOutcome, StepRequest, Subject, VerifyRequest
from lethe.kernel.errors import LetheError, ServiceUnavailable
from tests.steps import decision, step, step_request

SYSTEM = "patients-db"
A = "p-1001"
B = "p-1002"
CITATION = "GDPR Art. 17(3)(c): public health"
DOB_A = date(1984, 3, 9)
DOB_B = date(1990, 7, 1)

Rows = dict[str, list[tuple[Any, ...]]]


@dataclass
class Hospital:
    """One test's schema and the tables in it."""

    engine: AsyncEngine
    schema: str
    metadata: MetaData

    def name(self, table: str) -> str:
        """The schema-qualified name the data map uses."""
        return f"{self.schema}.{table}"

    def table(self, table: str) -> Table:
        """A table of the hospital."""
        return self.metadata.tables[self.name(table)]

    async def rows(self) -> Rows:
        """Every row of every table, sorted, to compare before and after."""
        found: Rows = {}
        async with self.engine.connect() as conn:
            for table in self.metadata.sorted_tables:
                result = await conn.execute(select(table))
                found[table.name] = sorted(tuple(row) for row in result)
        return found

    async def patient(self, subject_id: str) -> dict[str, Any] | None:
        """The patients row of a subject, as a dict."""
        patients = self.table("patients")
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(select(patients).where(patients.c.patient_id == subject_id))
            ).one_or_none()
        return dict(row._mapping) if row else None

    async def table_names(self) -> list[str]:
        """The tables that exist in the schema now."""
        async with self.engine.connect() as conn:
            return await conn.run_sync(
                lambda sync: inspect(sync).get_table_names(schema=self.schema)
            )


@pytest.fixture
async def hospital(sql_url: str) -> AsyncIterator[Hospital]:
    """A fresh schema with two subjects' patients, appointments, lab results and comments."""
    schema = f"lethe_t_{uuid.uuid4().hex[:12]}"
    metadata = MetaData(schema=schema)
    patients = Table(
        "patients",
        metadata,
        Column("patient_id", String(40), primary_key=True),
        Column("full_name", String(200), nullable=False),
        Column("email", String(200)),
        Column("phone", String(40)),
        Column("date_of_birth", Date, nullable=False),
        Column("mrn", String(4), nullable=False),
        Column("deleted_at", DateTime(timezone=True)),
    )
    appointments = Table(
        "appointments",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("patient_id", String(40), nullable=False),
        Column("notes", Text),
    )
    lab_results = Table(
        "lab_results",
        metadata,
        Column("id", Integer, primary_key=True),
        # Nullable: a lab result can be unlinked from its visit (anonymised).
        Column("appointment_id", Integer, ForeignKey(appointments.c.id)),
        Column("result", Text, nullable=False),
    )
    lab_comments = Table(
        "lab_comments",
        metadata,
        Column("id", Integer, primary_key=True),
        Column(
            "lab_result_id",
            Integer,
            ForeignKey(lab_results.c.id, ondelete="CASCADE"),
            nullable=False,
        ),
        Column("comment", Text),
    )
    engine = create_async_engine(sql_url)
    async with engine.begin() as conn:
        await conn.execute(CreateSchema(schema))
        await conn.run_sync(metadata.create_all)
        await conn.execute(
            insert(patients),
            [
                {
                    "patient_id": A,
                    "full_name": "Ada Lovelace",
                    "email": "ada@example.org",
                    "phone": "+44 20 7946 0001",
                    "date_of_birth": DOB_A,
                    "mrn": "M001",
                },
                {
                    "patient_id": B,
                    "full_name": "Grace Hopper",
                    "email": "grace@example.org",
                    "phone": "+1 202 555 0102",
                    "date_of_birth": DOB_B,
                    "mrn": "M002",
                },
            ],
        )
        await conn.execute(
            insert(appointments),
            [
                {"id": 1, "patient_id": A, "notes": "migraine follow-up"},
                {"id": 2, "patient_id": A, "notes": "blood test"},
                {"id": 3, "patient_id": B, "notes": "annual check"},
            ],
        )
        await conn.execute(
            insert(lab_results),
            [
                {"id": 10, "appointment_id": 1, "result": "MRI clear"},
                {"id": 11, "appointment_id": 2, "result": "HbA1c 5.1%"},
                {"id": 12, "appointment_id": 3, "result": "LDL 2.9"},
            ],
        )
        await conn.execute(
            insert(lab_comments),
            [
                {"id": 100, "lab_result_id": 11, "comment": "repeat in a year"},
                {"id": 101, "lab_result_id": 12, "comment": "diet advice given"},
            ],
        )
    try:
        yield Hospital(engine=engine, schema=schema, metadata=metadata)
    finally:
        async with engine.begin() as conn:
            await conn.execute(DropSchema(schema, cascade=True, if_exists=True))
        await engine.dispose()


def patients_locator(hospital: Hospital, **changes: object) -> SqlTableLocator:
    """The patients table as examples/datamap.yaml maps it, with `changes` applied."""
    fields: dict[str, object] = {
        "table": hospital.name("patients"),
        "subject_column": "patient_id",
        "soft_delete_column": "deleted_at",
        "columns": {
            "full_name": "user.name",
            "email": "user.contact.email",
            "phone": "user.contact.phone_number",
            "date_of_birth": "user.demographic.date_of_birth",
            "mrn": "user.health_and_medical.record_id",
        },
    }
    fields.update(changes)
    return SqlTableLocator.model_validate(fields)


def lab_results_locator(hospital: Hospital, **changes: object) -> SqlTableLocator:
    """Lab results, found through the subject's appointments."""
    fields: dict[str, object] = {
        "table": hospital.name("lab_results"),
        "subject_column": "patient_id",
        "via": [
            {"column": "appointment_id", "table": hospital.name("appointments"), "references": "id"}
        ],
        "columns": {"result": "user.health_and_medical.lab_result"},
    }
    fields.update(changes)
    return SqlTableLocator.model_validate(fields)


def request_for(
    locator: SqlTableLocator,
    action: Action,
    subject_id: str = A,
    keep: list[str] | None = None,
    connection: str = "LETHE_STACK_SQL_URL",
) -> StepRequest:
    """A step request as the erasure workflow would send it."""
    reason = decision(
        action,
        rule="test.rule",
        category="user.health_and_medical",
        citation=CITATION if action == "retain" else "GDPR Art. 17(1)",
    )
    return step_request(
        step(
            locator,
            action=action,
            system=SYSTEM,
            connection=connection,
            keep_columns=keep or [],
            decisions=[reason],
        ),
        subject=Subject(tenant="st-mary", subject_id=subject_id),
        subject_ref="ref-" + uuid.uuid4().hex,
    )


async def erase_and_verify(
    eraser: SqlEraser, request: StepRequest
) -> tuple[StepOutcome, StepOutcome]:
    """Erase, then verify, as the workflow does."""
    erased = await eraser.erase(request)
    return erased, await eraser.verify(request, erased)


def assert_no_subject_id(text: str, subject_id: str = A) -> None:
    """Outcomes and errors never carry the subject id."""
    assert subject_id not in text


def assert_unchained(error: BaseException) -> None:
    """No driver exception (whose text may hold parameters) rides along with a Lethe error."""
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__


@pytest.fixture
def eraser(clients: Clients, sql_url: str) -> SqlEraser:
    """The connector as the activity builds it: over the cached engine for the URL."""
    return SqlEraser.open(clients, sql_url)


# --- the actions -----------------------------------------------------------------------------


async def _session(engine: AsyncEngine) -> tuple[int, str]:
    """The PostgreSQL backend serving a connection from the engine's pool, and its application."""
    async with engine.connect() as conn:
        pid = await conn.scalar(text("SELECT pg_backend_pid()"))
        application = await conn.scalar(text("SELECT current_setting('application_name')"))
    assert isinstance(pid, int) and isinstance(application, str)
    return pid, application


async def test_erasers_of_one_connection_share_one_pool_of_sessions(sql_url: str) -> None:
    """A worker's clients hold one pool per connection string, whatever the number of steps: a
    second eraser runs on the session the first left in the pool; another connection string
    has its own; closing the clients (the worker stopping) closes the sessions on the server."""
    async with Clients() as clients:
        first, application = await _session(SqlEraser.open(clients, sql_url).engine)
        assert (await _session(SqlEraser.open(clients, sql_url).engine))[0] == first

        other_url = (
            make_url(sql_url)
            .update_query_dict({"application_name": "lethe-test-other"})
            .render_as_string(hide_password=False)
        )
        other, other_application = await _session(SqlEraser.open(clients, other_url).engine)
        assert other != first
        assert other_application == "lethe-test-other" != application

    async with Clients() as clients:
        again, _ = await _session(SqlEraser.open(clients, sql_url).engine)
        assert again not in (first, other)
        await _sessions_closed(SqlEraser.open(clients, sql_url).engine, first, other)


async def _sessions_closed(engine: AsyncEngine, first: int, other: int) -> None:
    """Wait until the server has no session `first` or `other` any more (or fail)."""
    alive = text("SELECT count(*) FROM pg_stat_activity WHERE pid IN (:first, :other)")
    async with engine.connect() as conn:
        for _ in range(100):
            if not await conn.scalar(alive, {"first": first, "other": other}):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the disposed pools' sessions are still open on the server after 10s")


async def test_delete_removes_only_the_subjects_row(hospital: Hospital, eraser: SqlEraser) -> None:
    before = await hospital.patient(B)
    erased, verified = await erase_and_verify(
        eraser, request_for(patients_locator(hospital), "delete")
    )
    assert (erased.status, erased.affected) == ("running", 1)
    assert (verified.status, verified.verified) == ("done", True)
    assert await hospital.patient(A) is None
    assert await hospital.patient(B) == before
    assert_no_subject_id(erased.model_dump_json() + verified.model_dump_json())


async def test_delete_through_a_join_path(hospital: Hospital, eraser: SqlEraser) -> None:
    before = await hospital.rows()
    erased, verified = await erase_and_verify(
        eraser, request_for(lab_results_locator(hospital), "delete")
    )
    after = await hospital.rows()
    assert (erased.affected, erased.evidence["join_hops"]) == (2, 1)
    assert verified.status == "done"
    assert after["lab_results"] == [(12, 3, "LDL 2.9")]
    assert after["lab_comments"] == [(101, 12, "diet advice given")]  # the schema's cascade
    assert after["appointments"] == before["appointments"]  # the path is only read
    assert after["patients"] == before["patients"]


def lab_comments_locator(hospital: Hospital, **changes: object) -> SqlTableLocator:
    """Comments on lab results, found through two hops; `lab_result_id` is NOT NULL under a
    foreign key."""
    fields: dict[str, object] = {
        "table": hospital.name("lab_comments"),
        "subject_column": "patient_id",
        "via": [
            {"column": "lab_result_id", "table": hospital.name("lab_results"), "references": "id"},
            {
                "column": "appointment_id",
                "table": hospital.name("appointments"),
                "references": "id",
            },
        ],
        "columns": {"comment": "user.content.free_text"},
    }
    fields.update(changes)
    return SqlTableLocator.model_validate(fields)


async def test_pseudonymise_through_a_two_hop_join_path_keeps_the_link(
    hospital: Hospital, eraser: SqlEraser
) -> None:
    erased, verified = await erase_and_verify(
        eraser, request_for(lab_comments_locator(hospital), "pseudonymize")
    )
    assert (erased.affected, verified.status) == (1, "done")
    assert (await hospital.rows())["lab_comments"] == [
        (100, 11, None),  # cleared, still linked to the subject's lab result
        (101, 12, "diet advice given"),
    ]
    assert "kept their link to the subject" in erased.detail
    assert "unlinked_to" not in erased.evidence


async def test_soft_delete_marks_the_row_and_clears_personal_columns(
    hospital: Hospital, eraser: SqlEraser
) -> None:
    before = await hospital.patient(B)
    started = datetime.now(UTC)
    erased, verified = await erase_and_verify(
        eraser, request_for(patients_locator(hospital), "soft_delete")
    )
    assert (erased.status, erased.affected, verified.status) == ("running", 1, "done")
    row = await hospital.patient(A)
    assert row is not None
    assert row["deleted_at"] is not None and row["deleted_at"] >= started - timedelta(seconds=5)
    assert row["email"] is None and row["phone"] is None  # nullable: NULL
    assert row["full_name"] == "erased"  # NOT NULL text: a placeholder
    assert row["mrn"] == "eras"  # ... cut to the column's length
    assert row["date_of_birth"] == date(1900, 1, 1)  # NOT NULL date: a valid, anonymous date
    assert await hospital.patient(B) == before
    assert verified.evidence["rows_not_cleared.full_name"] == 0
    assert_no_subject_id(erased.model_dump_json() + verified.model_dump_json())


async def test_soft_delete_twice_keeps_the_first_deletion_time(
    hospital: Hospital, eraser: SqlEraser
) -> None:
    request = request_for(patients_locator(hospital), "soft_delete")
    await eraser.erase(request)
    first = await hospital.patient(A)
    again, verified = await erase_and_verify(eraser, request)
    assert again.affected == 1  # rows matched, already erased: the same effect as once
    assert verified.status == "done"
    assert await hospital.patient(A) == first


async def test_delete_twice_reports_nothing_left_the_second_time(
    hospital: Hospital, eraser: SqlEraser
) -> None:
    request = request_for(lab_results_locator(hospital), "delete")
    await eraser.erase(request)
    after_first = await hospital.rows()
    again, verified = await erase_and_verify(eraser, request)
    assert (again.status, again.affected, verified.status) == ("running", 0, "done")
    assert await hospital.rows() == after_first


async def test_keep_columns_stay_while_the_rest_are_cleared(
    hospital: Hospital, eraser: SqlEraser
) -> None:
    request = request_for(patients_locator(hospital), "soft_delete", keep=["mrn", "date_of_birth"])
    erased, verified = await erase_and_verify(eraser, request)
    row = await hospital.patient(A)
    assert row is not None
    assert (row["mrn"], row["date_of_birth"]) == ("M001", DOB_A)
    assert (row["full_name"], row["email"], row["phone"]) == ("erased", None, None)
    assert row["deleted_at"] is not None
    assert (erased.evidence["columns_kept"], erased.evidence["columns_cleared"]) == (2, 3)
    assert verified.status == "done"


async def test_pseudonymize_clears_without_marking_the_row_and_keeps_the_subject_column(
    hospital: Hospital, eraser: SqlEraser
) -> None:
    erased, verified = await erase_and_verify(
        eraser, request_for(patients_locator(hospital), "pseudonymize")
    )
    row = await hospital.patient(A)
    assert row is not None  # still found by the subject id: still personal data
    assert row["deleted_at"] is None
    assert (row["full_name"], row["email"], row["mrn"]) == ("erased", None, "eras")
    assert (erased.affected, verified.status) == (1, "done")
    assert "pseudonymised" in erased.detail


async def test_anonymize_unlinks_the_subject_column_with_a_surrogate(
    hospital: Hospital, eraser: SqlEraser
) -> None:
    """The patients row keeps no subject id: it becomes a random surrogate (NOT NULL, no
    foreign key), so the row no longer leads to the subject (Recital 26)."""
    before = await hospital.rows()
    erased, verified = await erase_and_verify(
        eraser, request_for(patients_locator(hospital), "anonymize")
    )
    assert (erased.affected, verified.status) == (1, "done")
    assert await hospital.patient(A) is None
    after = await hospital.rows()
    [changed] = [r for r in after["patients"] if r not in before["patients"]]
    assert changed[0].startswith("anon-") and len(changed[0]) == len("anon-") + 32
    assert changed[1:] == ("erased", None, None, date(1900, 1, 1), "eras", None)
    assert [r for r in after["patients"] if r[0] == B] == [
        r for r in before["patients"] if r[0] == B
    ]
    assert erased.evidence["unlinked_column"] == "patient_id"
    assert (erased.evidence["unlinked_to"], erased.evidence["rows_checked"]) == ("surrogate", 1)
    assert (verified.evidence["rows_linked"], verified.evidence["rows_matching"]) == (0, 0)
    assert "read back by primary key" in verified.detail
    assert_no_subject_id(erased.model_dump_json() + verified.model_dump_json())


async def test_anonymize_gives_each_row_its_own_surrogate(
    hospital: Hospital, eraser: SqlEraser
) -> None:
    """Ada's two visits lose her id, and nothing ties them to each other either."""
    locator = SqlTableLocator(
        table=hospital.name("appointments"),
        subject_column="patient_id",
        columns={"notes": "user.health_and_medical.encounter"},
    )
    erased, verified = await erase_and_verify(eraser, request_for(locator, "anonymize"))
    assert (erased.affected, verified.status) == (2, "done")
    rows = (await hospital.rows())["appointments"]
    assert rows[2] == (3, B, "annual check")
    surrogates = {rows[0][1], rows[1][1]}
    assert len(surrogates) == 2 and all(s.startswith("anon-") for s in surrogates)
    assert (rows[0][2], rows[1][2]) == (None, None)


async def test_anonymize_through_a_join_path_unlinks_the_first_hop_with_null(
    hospital: Hospital, eraser: SqlEraser
) -> None:
    before = await hospital.rows()
    erased, verified = await erase_and_verify(
        eraser, request_for(lab_results_locator(hospital), "anonymize")
    )
    assert (erased.affected, verified.status) == (2, "done")
    after = await hospital.rows()
    assert after["lab_results"] == [
        (10, None, "erased"),  # NOT NULL text: a placeholder; the join column: NULL
        (11, None, "erased"),
        (12, 3, "LDL 2.9"),
    ]
    assert after["appointments"] == before["appointments"]  # the path is only read
    assert (erased.evidence["unlinked_column"], erased.evidence["unlinked_to"]) == (
        "appointment_id",
        "null",
    )


async def test_anonymize_refuses_a_not_null_join_column_under_a_foreign_key(
    hospital: Hospital, eraser: SqlEraser
) -> None:
    """Neither NULL nor a random value can unlink lab_comments.lab_result_id: nothing changes,
    and the preflight says so first."""
    before = await hospital.rows()
    request = request_for(lab_comments_locator(hospital), "anonymize")
    [problem] = await eraser.preflight(request)
    assert problem.startswith("UnlinkNotPossible: ")
    assert "'lab_result_id'" in problem and hospital.name("lab_comments") in problem
    assert "NOT NULL and under a foreign key" in problem and "pseudonymize" in problem
    with pytest.raises(UnlinkNotPossible) as raised:
        await eraser.erase(request)
    assert str(raised.value) in problem
    assert_no_subject_id(str(raised.value))
    assert await hospital.rows() == before
    # Pseudonymising it is possible (the link stays).
    assert await eraser.preflight(request_for(lab_comments_locator(hospital), "pseudonymize")) == []


@pytest.mark.parametrize(
    ("locator", "unlink", "named"),
    [
        ("patients", "null", "NOT NULL, so `unlink: null`"),
        ("lab_results", "surrogate", "under a foreign key, so a random surrogate"),
    ],
)
async def test_an_unlink_the_column_cannot_take_is_refused(
    hospital: Hospital, eraser: SqlEraser, locator: str, unlink: str, named: str
) -> None:
    before = await hospital.rows()
    make = patients_locator if locator == "patients" else lab_results_locator
    request = request_for(make(hospital, unlink=unlink), "anonymize")
    with pytest.raises(UnlinkNotPossible, match=named):
        await eraser.erase(request)
    assert await hospital.rows() == before


async def test_anonymize_needs_a_primary_key(sql_url: str, eraser: SqlEraser) -> None:
    table = Table(
        f"visits_nokey_{uuid.uuid4().hex[:12]}",
        MetaData(),
        Column("patient_no", Integer),
        Column("reason", Text),
    )
    engine = create_async_engine(sql_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(table.metadata.create_all)
            await conn.execute(insert(table), [{"patient_no": 42, "reason": "flu"}])
        request = request_for(_visits_locator(table), "anonymize", subject_id="42")
        [problem] = await eraser.preflight(request)
        assert "needs a primary key" in problem and table.name in problem
        with pytest.raises(UnlinkNotPossible, match="needs a primary key"):
            await eraser.erase(request)
        # Pseudonymising needs none.
        erased = await eraser.erase(request_for(_visits_locator(table), "pseudonymize", "42"))
        assert erased.affected == 1
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(table.metadata.drop_all)
        await engine.dispose()


async def test_anonymize_rolls_back_when_a_row_read_back_is_still_linked(
    hospital: Hospital, eraser: SqlEraser
) -> None:
    """A trigger that puts the subject id back: the read-back by primary key, before the
    commit, finds the rows still linked, and nothing is committed."""
    name = f"{hospital.schema}.keep_patient_id"
    async with hospital.engine.begin() as conn:
        await conn.execute(
            text(
                f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN NEW.patient_id := OLD.patient_id; RETURN NEW; END $$"
            )
        )
        await conn.execute(
            text(
                f"CREATE TRIGGER keep_patient_id BEFORE UPDATE ON "
                f"{hospital.name('appointments')} FOR EACH ROW EXECUTE FUNCTION {name}()"
            )
        )
    before = await hospital.rows()
    locator = SqlTableLocator(
        table=hospital.name("appointments"),
        subject_column="patient_id",
        columns={"notes": "user.health_and_medical.encounter"},
    )
    with pytest.raises(ChangeRefused, match="2 still lead to the subject") as raised:
        await eraser.erase(request_for(locator, "anonymize"))
    assert "nothing was committed" in str(raised.value)
    assert_no_subject_id(str(raised.value))
    assert await hospital.rows() == before


@pytest.mark.parametrize(
    ("action", "event", "error", "retryable"),
    [("soft_delete", "UPDATE", ChangeRefused, False), ("delete", "DELETE", RowsChanged, True)],
)
async def test_rows_a_trigger_skips_are_not_reported_as_erased(
    hospital: Hospital,
    eraser: SqlEraser,
    action: Action,
    event: str,
    error: type[LetheError],
    retryable: bool,
) -> None:
    """A trigger that skips the change: the counts disagree, nothing is committed. Locked rows
    (an update) cannot have gone: no retry mends it. Unlocked rows (a delete) may have been
    deleted by another writer meanwhile: the step runs again."""
    name = f"{hospital.schema}.skip_change"
    async with hospital.engine.begin() as conn:
        await conn.execute(
            text(
                f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RETURN NULL; END $$"
            )
        )
        await conn.execute(
            text(
                f"CREATE TRIGGER skip_change BEFORE {event} ON {hospital.name('patients')} "
                f"FOR EACH ROW EXECUTE FUNCTION {name}()"
            )
        )
    before = await hospital.rows()
    with pytest.raises(error, match="nothing was committed") as raised:
        await eraser.erase(request_for(patients_locator(hospital), action))
    assert raised.value.retryable is retryable
    assert_no_subject_id(str(raised.value))
    assert await hospital.rows() == before


async def test_verify_fails_when_an_anonymised_row_leads_to_the_subject_again(
    hospital: Hospital, eraser: SqlEraser
) -> None:
    request = request_for(lab_results_locator(hospital), "anonymize")
    erased = await eraser.erase(request)
    lab_results = hospital.table("lab_results")
    async with hospital.engine.begin() as conn:
        await conn.execute(
            update(lab_results).where(lab_results.c.id == 10).values(appointment_id=1)
        )
    verified = await eraser.verify(request, erased)
    assert (verified.status, verified.evidence["rows_linked"]) == ("failed", 1)
    assert "still lead to the subject" in verified.detail


async def test_a_retain_step_is_refused_and_changes_nothing(
    hospital: Hospital, eraser: SqlEraser
) -> None:
    """The regional workflow records retain steps itself: a connector given one refuses it."""
    before = await hospital.rows()
    request = request_for(patients_locator(hospital), "retain")
    with pytest.raises(UnsupportedStep, match="kept by policy"):
        await eraser.erase(request)
    with pytest.raises(UnsupportedStep, match="kept by policy"):
        await eraser.preflight(request)
    assert await hospital.rows() == before


async def test_anonymize_with_every_column_kept_is_a_retain(
    hospital: Hospital, eraser: SqlEraser
) -> None:
    before = await hospital.rows()
    request = request_for(lab_results_locator(hospital), "anonymize", keep=["result"])
    assert (await eraser.erase(request)).status == "retained"
    assert await hospital.rows() == before


# --- verification finds what erase missed ------------------------------------------------------


async def test_verify_fails_when_a_deleted_row_comes_back(
    hospital: Hospital, eraser: SqlEraser
) -> None:
    request = request_for(patients_locator(hospital), "delete")
    erased = await eraser.erase(request)
    async with hospital.engine.begin() as conn:
        await conn.execute(
            insert(hospital.table("patients")),
            {"patient_id": A, "full_name": "Ada", "date_of_birth": DOB_A, "mrn": "M001"},
        )
    verified = await eraser.verify(request, erased)
    assert (verified.status, verified.verified) == ("failed", True)
    assert hospital.name("patients") in verified.detail
    assert_no_subject_id(verified.model_dump_json())


async def test_verify_fails_naming_a_column_that_is_not_cleared(
    hospital: Hospital, eraser: SqlEraser
) -> None:
    request = request_for(patients_locator(hospital), "soft_delete")
    erased = await eraser.erase(request)
    patients = hospital.table("patients")
    async with hospital.engine.begin() as conn:
        await conn.execute(
            update(patients).where(patients.c.patient_id == A).values(email="ada@example.org")
        )
    verified = await eraser.verify(request, erased)
    assert verified.status == "failed"
    assert "email" in verified.detail and hospital.name("patients") in verified.detail
    assert verified.evidence["rows_not_cleared.email"] == 1
    assert "ada@example.org" not in verified.model_dump_json()


# --- bad input: nothing changes --------------------------------------------------------------


def _hop(column: str, table: str, references: str) -> dict[str, str]:
    return {"column": column, "table": table, "references": references}


MISSING: list[tuple[str, str, dict[str, object], str, str]] = [
    # (case, action, locator changes, the table named, the missing thing named)
    ("table", "delete", {"table": "{s}.no_such_table"}, "{s}.no_such_table", "no_such_table"),
    ("schema", "delete", {"table": "nowhere.patients"}, "nowhere.patients", "nowhere.patients"),
    ("subject column", "delete", {"subject_column": "pid"}, "{s}.patients", "pid"),
    (
        "personal column",
        "anonymize",
        {"columns": {"full_name": "user.name", "ssn": "user.government_id"}},
        "{s}.patients",
        "ssn",
    ),
    (
        "soft-delete column",
        "soft_delete",
        {"soft_delete_column": "removed_at"},
        "{s}.patients",
        "removed_at",
    ),
    (
        "join table",
        "delete",
        {"via": [_hop("mrn", "{s}.no_such_table", "id")]},
        "{s}.no_such_table",
        "no_such_table",
    ),
    (
        "join column",
        "delete",
        {"via": [_hop("appointment_no", "{s}.appointments", "id")]},
        "{s}.patients",
        "appointment_no",
    ),
    (
        "referenced column",
        "delete",
        {"via": [_hop("mrn", "{s}.appointments", "code")]},
        "{s}.appointments",
        "code",
    ),
]


def _in_schema(value: object, schema: str) -> Any:
    if isinstance(value, str):
        return value.replace("{s}", schema)
    if isinstance(value, dict):
        return {k: _in_schema(v, schema) for k, v in value.items()}
    if isinstance(value, list):
        return [_in_schema(v, schema) for v in value]
    return value


@pytest.mark.parametrize(
    ("action", "changes", "table", "missing"),
    [case[1:] for case in MISSING],
    ids=[case[0] for case in MISSING],
)
async def test_a_missing_table_or_column_is_a_schema_mismatch(
    hospital: Hospital,
    eraser: SqlEraser,
    action: Action,
    changes: dict[str, object],
    table: str,
    missing: str,
) -> None:
    before = await hospital.rows()
    locator = patients_locator(hospital, **_in_schema(changes, hospital.schema))
    with pytest.raises(SchemaMismatch) as raised:
        await eraser.erase(request_for(locator, action))
    message = str(raised.value)
    assert SYSTEM in message
    assert _in_schema(table, hospital.schema) in message
    assert missing in message
    assert_no_subject_id(message)
    assert_unchained(raised.value)
    assert await hospital.rows() == before


async def test_a_step_reads_the_catalog_once_for_erase_and_verify(
    hospital: Hospital, eraser: SqlEraser
) -> None:
    """Erase and verify of a step, and the next step on the same tables, share one description
    of the tables (kept for a short time per engine and table)."""
    reads = eraser.schemas.reads
    await erase_and_verify(eraser, request_for(patients_locator(hospital), "soft_delete"))
    assert eraser.schemas.reads == reads + 1
    await erase_and_verify(eraser, request_for(patients_locator(hospital), "soft_delete", B))
    assert eraser.schemas.reads == reads + 1


@pytest.mark.parametrize("action", ["soft_delete", "delete"])
async def test_a_column_dropped_after_the_tables_were_described_is_a_schema_mismatch(
    hospital: Hospital, eraser: SqlEraser, action: Action
) -> None:
    """A kept description goes stale when a mapped column is dropped: the next step's statement
    fails, the tables are read again, and the step fails naming the column; nothing changed."""
    await erase_and_verify(eraser, request_for(patients_locator(hospital), "soft_delete"))
    async with hospital.engine.begin() as conn:
        await conn.execute(text(f"ALTER TABLE {hospital.name('patients')} DROP COLUMN phone"))
    before = await _rows_of(hospital, "patients")
    reads = eraser.schemas.reads

    with pytest.raises(SchemaMismatch) as raised:
        await eraser.erase(request_for(patients_locator(hospital), action, B))

    assert not raised.value.retryable
    assert str(raised.value) == (
        f"system {SYSTEM!r}: table {hospital.name('patients')!r} has no column 'phone' "
        "(a personal column)"
    )
    assert eraser.schemas.reads == reads + 1  # read again once the statement failed
    assert await _rows_of(hospital, "patients") == before
    assert_unchained(raised.value)


async def _rows_of(hospital: Hospital, table: str) -> list[tuple[Any, ...]]:
    """A table's rows as they are now (the hospital's own metadata may name dropped columns)."""
    async with hospital.engine.connect() as conn:
        result = await conn.execute(text(f"SELECT * FROM {hospital.name(table)} ORDER BY 1"))
        return [tuple(row) for row in result]


async def test_soft_delete_needs_a_soft_delete_column(
    hospital: Hospital, eraser: SqlEraser
) -> None:
    before = await hospital.rows()
    locator = patients_locator(hospital, soft_delete_column=None)
    with pytest.raises(SoftDeleteNotPossible, match="soft_delete_column"):
        await eraser.erase(request_for(locator, "soft_delete"))
    assert await hospital.rows() == before


@pytest.mark.parametrize(
    "subject_id",
    ["1' OR '1'='1", "x; DROP TABLE patients", "x'); DROP TABLE patients; --", "%", "*", "p-100_"],
)
async def test_ids_that_look_like_sql_touch_nothing(
    hospital: Hospital, eraser: SqlEraser, subject_id: str
) -> None:
    before = await hospital.rows()
    tables = await hospital.table_names()
    steps: list[tuple[SqlTableLocator, Action]] = [
        (patients_locator(hospital), "delete"),
        (patients_locator(hospital), "soft_delete"),
        (lab_results_locator(hospital), "delete"),
    ]
    for locator, action in steps:
        erased, verified = await erase_and_verify(
            eraser, request_for(locator, action, subject_id=subject_id)
        )
        assert (erased.affected, verified.status) == (0, "done")
        assert_no_subject_id(erased.model_dump_json() + verified.model_dump_json(), subject_id)
    assert await hospital.rows() == before
    assert await hospital.table_names() == tables


async def test_a_subject_whose_id_looks_like_sql_is_matched_as_data(
    hospital: Hospital, eraser: SqlEraser
) -> None:
    odd = "x'; DROP TABLE patients; --"
    async with hospital.engine.begin() as conn:
        await conn.execute(
            insert(hospital.table("patients")),
            {"patient_id": odd, "full_name": "Odd", "date_of_birth": DOB_B, "mrn": "M003"},
        )
    erased, verified = await erase_and_verify(
        eraser, request_for(patients_locator(hospital), "delete", subject_id=odd)
    )
    assert (erased.affected, verified.status) == (1, "done")
    assert await hospital.patient(odd) is None
    assert await hospital.patient(A) is not None and await hospital.patient(B) is not None


@pytest.fixture
async def visits(sql_url: str) -> AsyncIterator[tuple[AsyncEngine, Table]]:
    """A table in the default schema whose subject column is an integer."""
    table = Table(
        f"visits_{uuid.uuid4().hex[:12]}",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("patient_no", Integer, nullable=False),
        Column("reason", Text),
        Column("extra", JSON, nullable=False),
    )
    engine = create_async_engine(sql_url)
    async with engine.begin() as conn:
        await conn.run_sync(table.metadata.create_all)
        await conn.execute(
            insert(table),
            [
                {"id": 1, "patient_no": 42, "reason": "flu", "extra": {}},
                {"id": 2, "patient_no": 43, "reason": "sprain", "extra": {}},
            ],
        )
    try:
        yield engine, table
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(table.metadata.drop_all)
        await engine.dispose()


async def _visit_rows(engine: AsyncEngine, table: Table) -> list[tuple[Any, ...]]:
    async with engine.connect() as conn:
        return sorted(tuple(r) for r in await conn.execute(select(table.c.id, table.c.reason)))


def _visits_locator(table: Table, columns: dict[str, str] | None = None) -> SqlTableLocator:
    return SqlTableLocator(
        table=table.name, subject_column="patient_no", columns=columns or {"reason": "user"}
    )


@pytest.mark.parametrize(
    "subject_id", ["abc", "1' OR '1'='1", "x; DROP TABLE patients", "42.0", "99999999999"]
)
async def test_an_id_that_does_not_fit_an_integer_column_is_refused(
    visits: tuple[AsyncEngine, Table], eraser: SqlEraser, subject_id: str
) -> None:
    engine, table = visits
    before = await _visit_rows(engine, table)
    request = request_for(_visits_locator(table), "delete", subject_id=subject_id)
    with pytest.raises(SubjectIdDoesNotFit) as raised:
        await eraser.erase(request)
    message = str(raised.value)
    assert "patient_no" in message and "does not fit" in message
    assert_no_subject_id(message, subject_id)
    assert await _visit_rows(engine, table) == before


async def test_a_numeric_id_matches_an_integer_column(
    visits: tuple[AsyncEngine, Table], eraser: SqlEraser
) -> None:
    engine, table = visits
    erased, verified = await erase_and_verify(
        eraser, request_for(_visits_locator(table), "anonymize", subject_id="42")
    )
    assert (erased.affected, verified.status) == (1, "done")
    assert await _visit_rows(engine, table) == [(1, None), (2, "sprain")]
    async with engine.connect() as conn:
        numbers = dict((await conn.execute(select(table.c.id, table.c.patient_no))).all())
    assert numbers[2] == 43 and numbers[1] <= -(2**30)  # an integer surrogate: negative


async def test_a_not_null_column_without_a_placeholder_is_refused(
    visits: tuple[AsyncEngine, Table], eraser: SqlEraser
) -> None:
    engine, table = visits
    before = await _visit_rows(engine, table)
    locator = _visits_locator(table, {"reason": "user", "extra": "user"})
    with pytest.raises(NoPlaceholder, match="extra"):
        await eraser.erase(request_for(locator, "anonymize", subject_id="42"))
    assert await _visit_rows(engine, table) == before


async def test_a_constraint_refusing_the_placeholder_rolls_back_without_values(
    hospital: Hospital, eraser: SqlEraser
) -> None:
    patients = hospital.table("patients")
    async with hospital.engine.begin() as conn:
        await conn.execute(
            update(patients).where(patients.c.patient_id == B).values(full_name="erased")
        )
        await conn.execute(AddConstraint(UniqueConstraint(patients.c.full_name, name="uq_name")))
    before = await hospital.rows()
    with pytest.raises(ChangeRefused) as raised:
        await eraser.erase(request_for(patients_locator(hospital), "soft_delete"))
    message = str(raised.value)
    assert SYSTEM in message and "UniqueViolation" in message
    assert "erased" not in message and "Ada" not in message
    assert_no_subject_id(message)
    assert_unchained(raised.value)
    assert await hospital.rows() == before


async def test_a_role_that_may_delete_but_not_update_can_delete(
    hospital: Hospital, sql_url: str
) -> None:
    """Counting the rows before a delete takes no FOR UPDATE lock, which would need UPDATE."""
    role = f"lethe_del_{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    async with hospital.engine.begin() as conn:
        await conn.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'"))
        await conn.execute(text(f"GRANT USAGE ON SCHEMA {hospital.schema} TO {role}"))
        await conn.execute(
            text(f"GRANT SELECT, DELETE ON ALL TABLES IN SCHEMA {hospital.schema} TO {role}")
        )
    engine = create_async_engine(make_url(sql_url).set(username=role, password=password))
    try:
        eraser = SqlEraser(engine)
        request = request_for(lab_results_locator(hospital), "delete")
        assert await eraser.preflight(request) == []
        erased, verified = await erase_and_verify(eraser, request)
        assert (erased.affected, verified.status) == (2, "done")
    finally:
        await engine.dispose()
        async with hospital.engine.begin() as conn:
            await conn.execute(text(f"DROP OWNED BY {role}"))
            await conn.execute(text(f"DROP ROLE {role}"))


async def test_an_unreachable_database_is_retryable_and_says_nothing_secret(
    clients: Clients,
) -> None:
    url = "postgresql+psycopg://lethe:s3cret-pw@127.0.0.1:1/patients"
    locator = SqlTableLocator(table="patients", subject_column="patient_id", columns={"x": "user"})
    with pytest.raises(ServiceUnavailable) as raised:
        await SqlEraser.open(clients, url).erase(request_for(locator, "delete"))
    message = str(raised.value)
    assert raised.value.retryable and SYSTEM in message
    assert "s3cret" not in message and "127.0.0.1" not in message
    assert_no_subject_id(message)


# --- the activities --------------------------------------------------------------------------


async def test_activities_run_in_their_region_and_type_their_errors(
    connectors: Connectors, hospital: Hospital, sql_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LETHE_TEST_PATIENTS_URL", sql_url)
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, task_queue="lethe-eu")
    request = request_for(
        patients_locator(hospital), "soft_delete", connection="LETHE_TEST_PATIENTS_URL"
    )
    erased = await env.run(connectors.activity("sql.erase"), request)
    verified = await env.run(
        connectors.activity("sql.verify"), VerifyRequest(request=request, erased=erased)
    )
    # The erase activity verifies too (one round trip a step); verify alone agrees.
    assert (erased.status, verified.status) == ("done", "done")

    broken = request_for(
        patients_locator(hospital, subject_column="pid"),
        "delete",
        connection="LETHE_TEST_PATIENTS_URL",
    )
    with pytest.raises(ApplicationError) as raised:
        await env.run(connectors.activity("sql.erase"), broken)
    assert raised.value.type == "SchemaMismatch" and raised.value.non_retryable
    assert_no_subject_id(str(raised.value))

    env.info = dataclasses.replace(env.info, task_queue="lethe-us")
    with pytest.raises(ApplicationError) as raised:
        await env.run(connectors.activity("sql.erase"), request)
    assert raised.value.type == "WrongRegion"


def test_errors_are_lethe_errors() -> None:
    for error in (
        SubjectIdDoesNotFit,
        SoftDeleteNotPossible,
        NoPlaceholder,
        ChangeRefused,
        UnlinkNotPossible,
    ):
        assert issubclass(error, LetheError) and not error.retryable


# --- a retry after the commit: the evidence of the attempt that did the work -------------------


def _activity_env(monkeypatch: pytest.MonkeyPatch, sql_url: str) -> ActivityEnvironment:
    """An activity environment on the region's queue, the patients database in a variable."""
    monkeypatch.setenv("LETHE_TEST_PATIENTS_URL", sql_url)
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, task_queue="lethe-eu")
    return env


async def _first_attempt(
    connectors: Connectors, env: ActivityEnvironment, request: StepRequest
) -> tuple[StepOutcome, list[Any]]:
    """Run the erase activity once, as attempt 1; its outcome and what it heartbeated."""
    beats: list[Any] = []
    env.on_heartbeat = lambda *details: beats.extend(details)
    outcome = await env.run(connectors.activity("sql.erase"), request)
    return outcome, beats


def _retry(env: ActivityEnvironment, details: list[Any]) -> list[Any]:
    """Make `env` attempt 2, with `details` as the heartbeat details that reached the server
    (the worker of attempt 1 was lost after its commit); what attempt 2 heartbeats."""
    env.info = dataclasses.replace(env.info, attempt=2, heartbeat_details=details)
    beats: list[Any] = []
    env.on_heartbeat = lambda *more: beats.extend(more)
    return beats


@pytest.mark.parametrize(
    ("action", "make", "rows"),
    [
        ("delete", lab_results_locator, 2),
        ("anonymize", lab_results_locator, 2),
        ("soft_delete", patients_locator, 1),
    ],
)
async def test_a_retry_after_the_commit_reports_the_rows_of_the_first_attempt(
    connectors: Connectors,
    hospital: Hospital,
    sql_url: str,
    monkeypatch: pytest.MonkeyPatch,
    action: Action,
    make: Callable[..., SqlTableLocator],
    rows: int,
) -> None:
    env = _activity_env(monkeypatch, sql_url)
    request = request_for(make(hospital), action, connection="LETHE_TEST_PATIENTS_URL")
    first, beats = await _first_attempt(connectors, env, request)
    assert (first.affected, first.evidence["rows_changed"]) == (rows, rows)
    [counted] = beats  # counted inside the transaction, before any row changed
    assert (counted["step"], counted["action"], counted["attempt"]) == (request.step.id, action, 1)
    assert (counted["rows"], counted["changed"]) == (rows, rows)
    assert isinstance(counted["digest"], str) and len(counted["digest"]) == 64
    assert_no_subject_id(repr(counted))
    after_first = await hospital.rows()

    again = _retry(env, beats)
    retried = await env.run(connectors.activity("sql.erase"), request)
    assert (retried.status, retried.verified) == ("done", True)
    assert retried.affected == rows  # not 0: the first attempt's count
    evidence = retried.evidence
    assert (evidence["rows_from_attempt"], evidence["counted_by_attempt"]) == (rows, 1)
    assert (evidence["rows"], evidence["rows_changed"], evidence["attempt"]) == (rows, 0, 2)
    assert "digest" not in evidence  # it stays in the heartbeat
    assert "attempt 1 had done it" in retried.detail
    assert again == beats  # the first attempt's count is carried on, not replaced
    assert await hospital.rows() == after_first  # the retry changed nothing
    if action == "soft_delete":
        assert evidence["rows_same_as_attempt"] is True  # the rows that stay are those counted
    assert_no_subject_id(retried.model_dump_json())


async def test_a_retry_whose_first_attempt_heartbeat_never_arrived_says_so(
    connectors: Connectors, hospital: Hospital, sql_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _activity_env(monkeypatch, sql_url)
    request = request_for(
        lab_results_locator(hospital), "delete", connection="LETHE_TEST_PATIENTS_URL"
    )
    await _first_attempt(connectors, env, request)
    beats = _retry(env, [])  # heartbeats are best-effort: none reached the server
    retried = await env.run(connectors.activity("sql.erase"), request)
    assert (retried.status, retried.affected) == ("done", 0)
    assert retried.evidence["rows_from_attempt"] is None
    assert "counted_by_attempt" not in retried.evidence
    assert "how many rows an earlier attempt changed is not known" in retried.detail
    assert beats == []  # nothing to count, and no count of its own to pass on as the first's


async def test_a_retry_whose_first_attempt_rolled_back_does_the_work_itself(
    connectors: Connectors, hospital: Hospital, sql_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attempt 1 heartbeated its count and was lost before its commit: nothing changed, so
    attempt 2 erases and reports its own rows."""
    env = _activity_env(monkeypatch, sql_url)
    request = request_for(
        lab_results_locator(hospital), "delete", connection="LETHE_TEST_PATIENTS_URL"
    )
    lost = {
        "kind": "sql.rows",
        "step": request.step.id,
        "action": "delete",
        "attempt": 1,
        "rows": 2,
        "changed": 2,
        "digest": "0" * 64,
    }
    beats = _retry(env, [lost])
    retried = await env.run(connectors.activity("sql.erase"), request)
    assert (retried.affected, retried.evidence["rows_changed"]) == (2, 2)
    assert "rows_from_attempt" not in retried.evidence
    assert [b["attempt"] for b in beats] == [2]
    assert (await hospital.rows())["lab_results"] == [(12, 3, "LDL 2.9")]


async def test_a_retry_changes_no_row_the_first_attempt_changed(
    connectors: Connectors, hospital: Hospital, sql_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Updates touch only rows not yet erased: the soft-deleted row is not written again (its
    row version, PostgreSQL's xmin, stays the first attempt's)."""
    env = _activity_env(monkeypatch, sql_url)
    request = request_for(
        patients_locator(hospital), "soft_delete", connection="LETHE_TEST_PATIENTS_URL"
    )
    patients = hospital.table("patients")
    version = select(text("xmin::text")).select_from(patients).where(patients.c.patient_id == A)
    _, beats = await _first_attempt(connectors, env, request)
    async with hospital.engine.connect() as conn:
        first = (await conn.execute(version)).scalar_one()
    _retry(env, beats)
    assert (await env.run(connectors.activity("sql.erase"), request)).evidence["rows_changed"] == 0
    async with hospital.engine.connect() as conn:
        assert (await conn.execute(version)).scalar_one() == first
