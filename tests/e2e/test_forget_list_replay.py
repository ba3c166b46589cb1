"""A database restored from a backup: `lethe forget-list replay` erases the subject again.

A patient is erased through the CLI; then the patients database is "restored" (the rows written
back as a backup from before the erasure would hold them). Replaying the forget-list for that
system erases the patient again, and only them, before the restored data is used.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import update
from sqlalchemy.ext.asyncio import create_async_engine

from tests.e2e.conftest import (
    Hospital,
    WorkerProcess,
    approve_and_complete,
    erase_and_wait_for_approval,
    sql_rows,
)


async def _restore(hospital: Hospital, before: dict[str, list[tuple[Any, ...]]]) -> None:
    """Write the rows back as they were before the erasure (what a restored backup holds)."""
    tables = {table.name: table for table in hospital.tables()}
    engine = create_async_engine(hospital.connections.sql_url)
    try:
        async with engine.begin() as conn:
            for table in tables.values():
                key = next(iter(table.primary_key.columns))
                for row in before[table.name]:
                    values = dict(zip(table.columns.keys(), row, strict=True))
                    await conn.execute(update(table).where(key == values[key.name]).values(values))
    finally:
        await engine.dispose()
    assert await sql_rows(hospital) == before


def _without(
    rows: dict[str, list[tuple[Any, ...]]], table: str, column: int
) -> dict[str, list[tuple[Any, ...]]]:
    return {
        name: [row[:column] + row[column + 1 :] for row in found] if name == table else found
        for name, found in rows.items()
    }


async def test_replay_reapplies_the_erasure_to_a_restored_database(
    hospital: Hospital, worker: WorkerProcess
) -> None:
    patient, other = hospital.patients[0], hospital.patients[1]
    before = await sql_rows(hospital)
    workflow_id = await erase_and_wait_for_approval(hospital, patient)
    await approve_and_complete(hospital, workflow_id)
    erased = await sql_rows(hospital)
    assert erased != before

    listed = await hospital.lethe("forget-list", "show", "--json")
    assert listed.code == 0, str(listed)
    entries = json.loads(listed.stdout)
    assert hospital.ref(patient) in {entry["subject_ref"] for entry in entries}
    assert patient.patient_id not in listed.stdout and patient.email not in listed.stdout

    await _restore(hospital, before)

    replayed = await hospital.lethe("forget-list", "replay", "--system", "patients-db", timeout=120)
    assert replayed.code == 0, str(replayed)
    assert "erased" in replayed.stdout
    patients, _, _ = hospital.tables()
    again = await sql_rows(hospital)
    deleted_at = list(patients.columns.keys()).index("deleted_at")
    # The same erasure, applied again and no more; only the soft-delete time is new.
    assert _without(again, patients.name, deleted_at) == _without(erased, patients.name, deleted_at)
    replayed_row = next(row for row in again[patients.name] if row[0] == patient.patient_id)
    assert replayed_row[deleted_at] is not None

    other_rows = [row for row in erased[patients.name] if row[0] == other.patient_id]
    assert other_rows == [row for row in before[patients.name] if row[0] == other.patient_id]


async def test_replay_names_an_unknown_system(hospital: Hospital, worker: WorkerProcess) -> None:
    result = await hospital.lethe("forget-list", "replay", "--system", "mainframe")
    assert result.code == 2
    assert "system 'mainframe' is not in the data map" in result.stderr
    assert "Traceback" not in result.stderr
