"""The SQL connector against the stack's PostgreSQL: each action, join paths, bad input.

Every test gets its own schema holding a small hospital (patients, appointments, lab results and
comments on them) with two subjects, and checks with SQLAlchemy that one subject's data is gone
or cleared while the other's is untouched.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
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
    update,
)
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.schema import AddConstraint, CreateSchema, DropSchema
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities import sql
from activities.common import SchemaMismatch
from activities.sql import (
    ChangeRefused,
    NoPlaceholder,
    SoftDeleteNotPossible,
    SqlEraser,
    SubjectIdDoesNotFit,
)
from classification.datamap import SqlTableLocator
from lethe.contracts import Action, Decision, Step, StepOutcome, StepRequest, Subject, VerifyRequest
from lethe.errors import LetheError, ServiceUnavailable

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


@pytest.fixture(scope="module", autouse=True)
async def _close_engines() -> AsyncIterator[None]:
    yield
    await sql.dispose_engines()


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
        Column("appointment_id", Integer, ForeignKey(appointments.c.id), nullable=False),
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
    now = datetime.now(UTC)
    step = Step(
        id=f"{SYSTEM}/0",
        system=SYSTEM,
        kind="sql",
        region="eu",
        connection=connection,
        locator=locator,
        action=action,
        phase="immediate",
        keep_columns=keep or [],
        decisions=[
            Decision(
                rule="test.rule",
                category="user.health_and_medical",
                strategy=action,
                citation=CITATION if action == "retain" else "GDPR Art. 17(1)",
            )
        ],
    )
    return StepRequest(
        request_id="req-1",
        subject_ref="ref-" + uuid.uuid4().hex,
        subject=Subject(tenant="st-mary", subject_id=subject_id),
        step=step,
        erasure_started_at=now,
        window_ends_at=now + timedelta(days=30),
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
def eraser(sql_url: str) -> SqlEraser:
    """The connector as the activity builds it: over the cached engine for the URL."""
    return SqlEraser.for_connection(sql_url)


# --- the actions -----------------------------------------------------------------------------


async def test_engines_are_cached_per_connection(sql_url: str) -> None:
    assert SqlEraser.for_connection(sql_url).engine is SqlEraser.for_connection(sql_url).engine


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


async def test_anonymise_through_a_two_hop_join_path(hospital: Hospital, eraser: SqlEraser) -> None:
    locator = SqlTableLocator.model_validate(
        {
            "table": hospital.name("lab_comments"),
            "subject_column": "patient_id",
            "via": [
                {
                    "column": "lab_result_id",
                    "table": hospital.name("lab_results"),
                    "references": "id",
                },
                {
                    "column": "appointment_id",
                    "table": hospital.name("appointments"),
                    "references": "id",
                },
            ],
            "columns": {"comment": "user.content.free_text"},
        }
    )
    erased, verified = await erase_and_verify(eraser, request_for(locator, "anonymize"))
    assert (erased.affected, verified.status) == (1, "done")
    assert (await hospital.rows())["lab_comments"] == [
        (100, 11, None),
        (101, 12, "diet advice given"),
    ]


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


async def test_anonymize_clears_without_marking_the_row(
    hospital: Hospital, eraser: SqlEraser
) -> None:
    erased, verified = await erase_and_verify(
        eraser, request_for(patients_locator(hospital), "anonymize")
    )
    row = await hospital.patient(A)
    assert row is not None
    assert row["deleted_at"] is None
    assert (row["full_name"], row["email"], row["mrn"]) == ("erased", None, "eras")
    assert (erased.affected, verified.status) == (1, "done")


async def test_anonymize_through_a_join_path_uses_a_placeholder_for_not_null_text(
    hospital: Hospital, eraser: SqlEraser
) -> None:
    erased, verified = await erase_and_verify(
        eraser, request_for(lab_results_locator(hospital), "anonymize")
    )
    assert (erased.affected, verified.status) == (2, "done")
    assert (await hospital.rows())["lab_results"] == [
        (10, 1, "erased"),
        (11, 2, "erased"),
        (12, 3, "LDL 2.9"),
    ]


async def test_retain_changes_nothing_and_cites_the_law(
    hospital: Hospital, eraser: SqlEraser
) -> None:
    before = await hospital.rows()
    request = request_for(patients_locator(hospital), "retain")
    erased, verified = await erase_and_verify(eraser, request)
    assert (erased.status, erased.affected) == ("retained", 0)
    assert CITATION in erased.detail
    assert verified.status == "retained"
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


async def test_an_unreachable_database_is_retryable_and_says_nothing_secret() -> None:
    url = "postgresql+psycopg://lethe:s3cret-pw@127.0.0.1:1/patients"
    locator = SqlTableLocator(table="patients", subject_column="patient_id", columns={"x": "user"})
    with pytest.raises(ServiceUnavailable) as raised:
        await SqlEraser.for_connection(url).erase(request_for(locator, "delete"))
    message = str(raised.value)
    assert raised.value.retryable and SYSTEM in message
    assert "s3cret" not in message and "127.0.0.1" not in message
    assert_no_subject_id(message)


# --- the activities --------------------------------------------------------------------------


async def test_activities_run_in_their_region_and_type_their_errors(
    hospital: Hospital, sql_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LETHE_TEST_PATIENTS_URL", sql_url)
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, task_queue="lethe-eu")
    request = request_for(
        patients_locator(hospital), "soft_delete", connection="LETHE_TEST_PATIENTS_URL"
    )
    erased = await env.run(sql.erase, request)
    verified = await env.run(sql.verify, VerifyRequest(request=request, erased=erased))
    # The erase activity verifies too (one round trip a step); verify alone agrees.
    assert (erased.status, verified.status) == ("done", "done")

    broken = request_for(
        patients_locator(hospital, subject_column="pid"),
        "delete",
        connection="LETHE_TEST_PATIENTS_URL",
    )
    with pytest.raises(ApplicationError) as raised:
        await env.run(sql.erase, broken)
    assert raised.value.type == "SchemaMismatch" and raised.value.non_retryable
    assert_no_subject_id(str(raised.value))

    env.info = dataclasses.replace(env.info, task_queue="lethe-us")
    with pytest.raises(ApplicationError) as raised:
        await env.run(sql.erase, request)
    assert raised.value.type == "WrongRegion"


def test_errors_are_lethe_errors() -> None:
    for error in (SubjectIdDoesNotFit, SoftDeleteNotPossible, NoPlaceholder, ChangeRefused):
        assert issubclass(error, LetheError) and not error.retryable
