"""A second `lethe erase` for the same subject says it joined, and refuses new identities."""

from __future__ import annotations

from tests.e2e.conftest import Hospital, WorkerProcess, erase_and_wait_for_approval


async def test_a_second_request_says_it_joined_and_refuses_new_identities(
    hospital: Hospital, worker: WorkerProcess
) -> None:
    patient = hospital.patients[-1]
    workflow_id = await erase_and_wait_for_approval(hospital, patient)

    again = await hospital.lethe(
        "erase", "--tenant", hospital.tenant, "--subject", patient.patient_id, "--no-wait"
    )
    assert again.code == 0, str(again)
    assert f"joined erasure request {workflow_id}" in again.stderr

    other = await hospital.lethe(
        "erase", "--tenant", hospital.tenant, "--subject", patient.patient_id,
        "--identity", "email=other@st-mary.example", "--no-wait",
    )  # fmt: skip
    assert other.code == 3, str(other)
    assert f"joined erasure request {workflow_id}" in other.stderr
    assert "identities given now were not added" in other.stderr
    assert "other@st-mary.example" not in other.stderr + other.stdout

    rejected = await hospital.lethe("reject", workflow_id, "--by", "dpo", "--note", "test over")
    assert rejected.code == 0, str(rejected)
