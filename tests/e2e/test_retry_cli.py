"""`lethe retry`: a step that failed for good is run again, once the system is fixed, under the
original approval, and the certificate of the retry names the original request.

PostgreSQL refuses the patient's soft delete (a trigger the preflight cannot see raises on
every change to the run's patients table), so the request closes `incomplete` with
`patients-db/0` failed; the trigger is dropped, `lethe retry` re-runs that step alone, and
PostgreSQL's own client shows the row soft-deleted.
"""

from __future__ import annotations

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import create_async_engine

from lethe.evidence import ledger
from tests.e2e.conftest import (
    Hospital,
    WorkerProcess,
    approve_and_complete,
    certificate_of,
    erase_and_wait_for_approval,
)


async def _refuse_changes(hospital: Hospital, refuse: bool) -> None:
    """Put on (or take off) a trigger that makes PostgreSQL refuse changes to the patients."""
    table = hospital.tables()[0].name
    function, trigger = f"{table}_frozen", f"{table}_frozen_trigger"
    engine = create_async_engine(hospital.connections.sql_url)
    try:
        async with engine.begin() as conn:
            if refuse:
                await conn.execute(
                    text(
                        f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS "
                        "$$ BEGIN RAISE EXCEPTION 'patients are frozen'; END $$"
                    )
                )
                await conn.execute(
                    text(
                        f"CREATE TRIGGER {trigger} BEFORE UPDATE OR DELETE ON {table} "
                        f"FOR EACH ROW EXECUTE FUNCTION {function}()"
                    )
                )
            else:
                await conn.execute(text(f"DROP TRIGGER {trigger} ON {table}"))
                await conn.execute(text(f"DROP FUNCTION {function}()"))
    finally:
        await engine.dispose()


async def test_a_failed_step_is_retried_under_the_original_approval(
    hospital: Hospital, worker: WorkerProcess
) -> None:
    patient = hospital.patients[0]
    await _refuse_changes(hospital, True)
    workflow_id = await erase_and_wait_for_approval(hospital, patient)
    await approve_and_complete(hospital, workflow_id)
    original = await certificate_of(hospital, workflow_id)
    assert original["outcome"] == "incomplete"
    failed = [s["step_id"] for s in original["steps"] if s["status"] == "failed"]
    assert failed == ["patients-db/0"], original["steps"]

    # Refused clearly: a step that did not fail, one not in the plan.
    done = await hospital.lethe("retry", workflow_id, "--step", "session-cache/0", "--by", "bob")
    assert done.code == 2, str(done)
    assert "session-cache/0 (done) did not fail" in " ".join(done.stderr.split())
    unknown = await hospital.lethe("retry", workflow_id, "--step", "nowhere/0", "--by", "bob")
    assert unknown.code == 2, str(unknown)
    assert "nowhere/0 are not in the plan" in " ".join(unknown.stderr.split())

    await _refuse_changes(hospital, False)
    retried = await hospital.lethe("retry", workflow_id, "--by", "dpo-bob", "--json", timeout=120)
    assert retried.code == 0, str(retried)
    answer = retried.json()
    assert answer["retry_of"] == original["request_id"]
    assert answer["steps"] == ["patients-db/0"]
    assert answer["status"]["state"] == "completed"
    assert "the original approval (by dpo) stands" in " ".join(retried.stderr.split())
    assert answer["approved_by"] == "dpo"

    certificate = await certificate_of(hospital, workflow_id)
    assert certificate["request_id"] == answer["request_id"] != original["request_id"]
    assert certificate["plan"]["retry_of"] == original["request_id"]
    assert certificate["outcome"] == "erased"
    assert certificate["approval"]["by"] == "dpo"  # the original approver
    assert certificate["requested_by"] == "dpo-bob"
    assert [(s["step_id"], s["status"], s["affected"]) for s in certificate["steps"]] == [
        ("patients-db/0", "done", 1)
    ]

    patients = hospital.tables()[0]
    engine = create_async_engine(hospital.connections.sql_url)
    store = create_async_engine(hospital.store_url)
    try:
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    select(patients).where(patients.c.patient_id == patient.patient_id)
                )
            ).one()
        written = await ledger.entries(store, answer["request_id"])
    finally:
        await engine.dispose()
        await store.dispose()
    assert row.deleted_at is not None and row.email == "erased@erased.invalid"
    retried_entry = next(e for e in written if e.action == "erasure.retried")
    assert retried_entry.actor == "dpo-bob"
    assert retried_entry.details["retry_of"] == original["request_id"]
    assert retried_entry.details["steps"] == "patients-db/0"
    assert "erasure.approved" not in {e.action for e in written}

    verified = await hospital.lethe("audit", "verify")
    assert verified.code == 0 and "ledger intact" in verified.stdout, str(verified)
    again = await hospital.lethe("retry", workflow_id, "--by", "dpo-bob")
    assert again.code == 2, str(again)
    assert "completed erased: no step failed" in " ".join(again.stderr.split())
