"""The SQL connector's preflight against the stack's PostgreSQL: it checks and touches nothing."""

from __future__ import annotations

import uuid

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from lethe.activities.sql import SqlEraser
from lethe.classification.datamap import SqlTableLocator
from tests.integration.test_sql import (
    Hospital,
    hospital,
    lab_results_locator,
    patients_locator,
    request_for,
)

__all__ = ["hospital"]  # fixtures, shared with test_sql.py


async def test_a_table_as_the_map_says_passes_and_nothing_changes(hospital: Hospital) -> None:
    before = await hospital.rows()
    eraser = SqlEraser(hospital.engine)
    assert await eraser.preflight(request_for(patients_locator(hospital), "soft_delete")) == []
    assert await eraser.preflight(request_for(lab_results_locator(hospital), "anonymize")) == []
    assert await hospital.rows() == before


async def test_a_missing_column_or_join_table_is_named(hospital: Hospital) -> None:
    eraser = SqlEraser(hospital.engine)
    columns = {"full_name": "user.name", "fax": "user.contact.phone_number"}
    problems = await eraser.preflight(
        request_for(patients_locator(hospital, columns=columns), "anonymize")
    )
    assert len(problems) == 1 and "has no column 'fax'" in problems[0]
    via = [{"column": "appointment_id", "table": hospital.name("visits"), "references": "id"}]
    problems = await eraser.preflight(request_for(lab_results_locator(hospital, via=via), "delete"))
    assert len(problems) == 1 and "no table" in problems[0] and "visits" in problems[0]


async def test_a_role_without_the_privilege_the_step_needs_is_named(
    hospital: Hospital, sql_url: str
) -> None:
    """A role that may read but not delete: the preflight says so before anything runs."""
    role = f"lethe_ro_{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    async with hospital.engine.begin() as conn:
        await conn.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'"))
        await conn.execute(text(f"GRANT USAGE ON SCHEMA {hospital.schema} TO {role}"))
        await conn.execute(
            text(f"GRANT SELECT ON ALL TABLES IN SCHEMA {hospital.schema} TO {role}")
        )
    url = make_url(sql_url).set(username=role, password=password)
    engine = create_async_engine(url)
    try:
        eraser = SqlEraser(engine)
        problems = await eraser.preflight(request_for(patients_locator(hospital), "delete"))
        assert problems == [
            f"system 'patients-db': the database role may not DELETE on table "
            f"'{hospital.name('patients')}'"
        ]
    finally:
        await engine.dispose()
        async with hospital.engine.begin() as conn:
            await conn.execute(text(f"DROP OWNED BY {role}"))
            await conn.execute(text(f"DROP ROLE {role}"))


async def test_a_preflight_uses_the_kept_description_checked_against_the_database(
    hospital: Hospital,
) -> None:
    """Preflights and erasures share one description (the catalog read once); a column dropped
    since it was read is still named."""
    eraser = SqlEraser(hospital.engine)
    request = request_for(patients_locator(hospital), "soft_delete")
    assert await eraser.preflight(request) == []
    assert await eraser.preflight(request) == []
    assert (await eraser.erase(request)).affected == 1
    assert await eraser.preflight(request) == []
    assert eraser.schemas.reads == 1
    async with hospital.engine.begin() as conn:
        await conn.execute(text(f"ALTER TABLE {hospital.name('patients')} DROP COLUMN phone"))
    [problem] = await eraser.preflight(request)
    assert problem.startswith("SchemaMismatch: ") and "has no column 'phone'" in problem
    assert eraser.schemas.reads == 2


async def test_a_problem_met_on_a_kept_description_is_checked_on_the_tables_read_afresh(
    hospital: Hospital,
) -> None:
    """An integer subject column made text since it was described: the id fits now, and the
    stale description does not fail the step."""
    table = hospital.name("visits")
    async with hospital.engine.begin() as conn:
        await conn.execute(text(f"CREATE TABLE {table} (id int PRIMARY KEY, patient_no int)"))
    locator = SqlTableLocator(table=table, subject_column="patient_no", columns={"id": "user"})
    request = request_for(locator, "delete", subject_id="abc")
    eraser = SqlEraser(hospital.engine)
    [problem] = await eraser.preflight(request)
    assert problem.startswith("SubjectIdDoesNotFit: ") and "abc" not in problem
    async with hospital.engine.begin() as conn:
        await conn.execute(text(f"ALTER TABLE {table} ALTER COLUMN patient_no TYPE text"))
    reads = eraser.schemas.reads
    assert await eraser.preflight(request) == []
    assert eraser.schemas.reads == reads + 1
