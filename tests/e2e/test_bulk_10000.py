"""Ten thousand patients erased by one bulk request on the real stack, with all five kinds of
system, and every system's own client checking the result.

The sample hospital is seeded with `PATIENTS` patients in PostgreSQL, Kafka, Redis and Azurite;
a worker process serves the run's region and control queue. The DPO hands `lethe erase
--subjects-file` a CSV of 10,000 of them; a legal hold covers 1% of those. Approved, the
request erases in batches of 1,000, continuing as new; the held patients wait until the holds
are released. Then every targeted patient is gone from each system and every other patient's
data is byte-identical (the checks of `test_bulk_erasure.py`), the history stays small, and
`lethe audit verify` checks every batch's root.

The patients' exports are found by name prefix here, not by index tag as the other modules find
them: Azurite answers a tag query from the first 5,000 blobs of a container only, without a
continuation, so with 10,200 exports it misses about half (Azure pages through all of them).
Erasing by tag on Azurite at this size leaves blobs behind; the connector's verification sees
them and fails those subjects by name (`1 of the subject's blob(s) remain`) rather than call
them erased.
"""

from __future__ import annotations

import time

import pytest

from lethe.evidence import bulk
from lethe.evidence.store import engine_for
from lethe.sdk import bulk as bulk_sdk
from tests.e2e.conftest import Hospital, WorkerProcess, footprint
from tests.e2e.test_bulk_erasure import (
    _bulk_id,
    _check_blobs,
    _check_kafka,
    _check_redis,
    _check_sql,
    _subjects_file,
    _wait_for,
)

TARGETS = 10_000
PATIENTS = TARGETS + 200
"""Patients seeded for this module (the e2e conftest reads it): the file's and 200 others."""
HELD = TARGETS // 100


@pytest.mark.timeout(1200)
async def test_ten_thousand_patients_in_one_bulk_request(
    hospital: Hospital, worker: WorkerProcess
) -> None:
    by_tag = "subject_tag: subject_ref"
    datamap = hospital.datamap.read_text()
    assert datamap.count(by_tag) == 1
    hospital.datamap.write_text(
        datamap.replace(by_tag, 'subject_prefix: "exports/{subject_ref}"')
    )  # the planner reads the map again when the file changes
    targets = hospital.patients[:TARGETS]
    held = targets[:: TARGETS // HELD]
    assert len(held) == HELD
    before = await footprint(hospital)
    client = await hospital.sdk()
    for patient in held:
        await client.place_hold(
            matter="case 9",
            scope="subject",
            value=hospital.ref(patient),
            placed_by="legal",
            reason="litigation",
        )

    began = time.monotonic()
    started = await hospital.lethe(
        "erase", "--tenant", hospital.tenant,
        "--subjects-file", str(_subjects_file(hospital, targets, "ten-thousand.csv")),
        "--reason", "the clinic closes", "--by", "clerk", "--batch-size", "1000",
        timeout=300,
    )  # fmt: skip
    bulk_id = _bulk_id(started)
    approved = await hospital.lethe("bulk", "approve", bulk_id, "--by", "dpo")
    assert approved.code == 0, str(approved)
    waiting = await _wait_for(hospital, bulk_id, "on_hold", timeout=900)
    erasing = time.monotonic() - began
    assert waiting["counts"]["held"] == HELD, waiting["counts"]
    assert waiting["counts"]["failed"] == 0, waiting["failures"]
    for hold in await client.list_holds():
        await client.release_hold(hold.id, released_by="legal")
    done = await _wait_for(hospital, bulk_id, "completed", timeout=600)
    counts = done["counts"]
    assert counts["total"] == TARGETS and counts["held"] == 0 and counts["failed"] == 0
    assert counts["erased"] + counts["incomplete"] == TARGETS
    statuses = {step["step_id"]: step["statuses"] for step in done["steps"]}
    assert all(sum(s.values()) == TARGETS for s in statuses.values()), statuses

    events, runs = await _history_size(hospital, bulk_id)
    print(
        f"\n{TARGETS:,} subjects: {erasing:.1f} s to the held ones' wait, "
        f"{events} history events in {runs} runs ({events * 1000 / TARGETS:.0f} per 1,000)"
    )
    assert runs >= 2 and events / runs < 2_000  # continued as new; no run near 51,200 events

    after = await footprint(hospital)
    _check_sql(hospital, targets, before, after)
    _check_redis(hospital, targets, before, after)
    _check_kafka(targets, before, after)
    _check_blobs(hospital, targets, before, after)

    store = await engine_for(hospital.store_url)
    assert await bulk.verify_bulk(store, bulk_id) == []
    for patient in (targets[1], targets[5_001], held[-1]):
        proofs = await bulk_sdk.subject_proofs(client, hospital.tenant, patient.patient_id)
        assert proofs and all(bulk.check_proof(proof) for proof in proofs)  # one a phase
    verified = await hospital.lethe("audit", "verify", timeout=300)
    assert verified.code == 0, str(verified)


async def _history_size(hospital: Hospital, bulk_id: str) -> tuple[int, int]:
    """The request's history events over all its runs, and how many runs."""
    temporal = (await hospital.sdk()).temporal
    events, runs, run_id = 0, 0, None
    while True:
        history = await temporal.get_workflow_handle(bulk_id, run_id=run_id).fetch_history()
        events, runs = events + len(history.events), runs + 1
        started = history.events[0].workflow_execution_started_event_attributes
        if not started.continued_execution_run_id:
            return events, runs
        run_id = started.continued_execution_run_id
