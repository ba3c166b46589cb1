"""A data map that names a column the table lacks: nothing is destroyed, the DPO sees why.

Before the fix, such a map was found out only when the SQL step ran, after the other steps had
erased for good (a half-erased subject). Now the preflight stops the request first, `lethe
status` shows the problem, and once the map is corrected `lethe recheck` lets it go on.
"""

from __future__ import annotations

from tests.e2e.conftest import Footprint, Hospital, WorkerProcess, footprint, status_of

MISSING = "phone_number_2"


async def test_a_wrong_map_stops_before_anything_is_destroyed(
    hospital: Hospital, worker: WorkerProcess
) -> None:
    good_map = hospital.datamap.read_text()
    assert "          phone: user.contact.phone_number\n" in good_map
    hospital.datamap.write_text(
        good_map.replace(
            "          phone: user.contact.phone_number\n",
            f"          {MISSING}: user.contact.phone_number\n",
        )
    )
    patient = hospital.patients[0]
    before: Footprint = await footprint(hospital)
    subject = ("--tenant", hospital.tenant, "--subject", patient.patient_id)
    identity = ("--identity", f"email={patient.email}")

    dry = await hospital.lethe("erase", *subject, *identity, "--dry-run")
    assert dry.code == 1, str(dry)
    assert MISSING in dry.stdout and "preflight found problems" in dry.stderr

    erase = await hospital.lethe("erase", *subject, *identity, "--by", "clerk")
    assert erase.code == 0, str(erase)
    workflow_id = hospital.workflow_id(patient)
    assert f"lethe recheck {workflow_id}" in erase.stderr
    status = await status_of(hospital, workflow_id)
    assert status["state"] == "preflight_failed"
    problems = {c["step_id"]: c["problems"] for c in status["preflight"]}
    assert list(problems) == ["patients-db/0"]
    assert (
        MISSING in problems["patients-db/0"][0] and "SchemaMismatch" in problems["patients-db/0"][0]
    )
    shown = await hospital.lethe("status", workflow_id)
    assert MISSING in shown.stdout and "preflight" in shown.stdout
    # Nothing anywhere was touched: not the other tables, not Kafka, Redis, backups or logs.
    assert await footprint(hospital) == before

    hospital.datamap.write_text(good_map)
    recheck = await hospital.lethe("recheck", workflow_id)
    assert recheck.code == 0, str(recheck)
    await hospital.wait_for(workflow_id, "awaiting_approval")
    assert (await status_of(hospital, workflow_id))["preflight"] == []
    assert await footprint(hospital) == before
    rejected = await hospital.lethe("reject", workflow_id, "--by", "dpo", "--note", "test over")
    assert rejected.code == 0, str(rejected)
