"""What the Temporal server stores of an erasure holds neither the subject's id nor their email.

The server (and anyone who can read it: operators, backups of its database) sees the raw
workflow histories. They are read here with a plain Temporal client that has no codec, as such
a reader would; only Lethe's codec, with the key, turns them back into what happened.
"""

from __future__ import annotations

import asyncio
import json
import re

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client as TemporalClient

from lethe.codec import converter as codec
from lethe.evidence import ledger
from lethe.evidence.store import engine_for
from lethe.kernel.regions import task_queue
from lethe.temporal.history import history_payloads
from tests.conftest import stack_variable
from tests.e2e.conftest import (
    Hospital,
    WorkerProcess,
    approve,
    erase_and_wait_for_approval,
    run_lethe,
)


async def test_the_server_never_sees_who_was_erased(
    hospital: Hospital, worker: WorkerProcess
) -> None:
    """The request's history (its steps run on the region's queue from it), its id, search
    attributes, queues, and the worker's log."""
    patient = hospital.patients[3]
    secrets = (patient.patient_id, patient.email)
    workflow_id = await erase_and_wait_for_approval(hospital, patient)
    await approve(hospital, workflow_id)
    certificate = await asyncio.wait_for((await hospital.sdk()).result(workflow_id), 90)
    assert certificate.subject_ref == hospital.ref(patient)

    raw = await TemporalClient.connect(
        stack_variable("LETHE_TEMPORAL_ADDRESS"),
        namespace=stack_variable("LETHE_TEMPORAL_NAMESPACE"),
    )
    parent = await raw.get_workflow_handle(workflow_id).fetch_history()
    steps_run = [
        event.activity_task_scheduled_event_attributes.activity_type.name
        for event in parent.events
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]
    # Not vacuous: the region's steps, immediate and deferred, ran from this history.
    assert {"sql.erase", "blob.erase"} <= set(steps_run), steps_run
    histories = {workflow_id: parent}

    seen_queues: set[str] = set()
    for run_id, history in histories.items():
        text = history.to_json()
        for secret in secrets:
            assert secret not in run_id
            assert secret not in text, f"{secret!r} is in the raw history of {run_id}"
        # Every payload of the workflow's own is ciphertext. The server's and the SDK's
        # bookkeeping (search attributes, local activity marker metadata) is plain, and was
        # checked for secrets with the rest of the history above.
        payloads = history_payloads(history, user_only=True)
        assert payloads
        assert all(p.metadata["encoding"] == codec.ENCODING for p in payloads)
        described = await raw.get_workflow_handle(run_id).describe()
        attributes = repr(described.typed_search_attributes) + repr(described.search_attributes)
        memo = repr(await described.memo())
        seen_queues.add(described.task_queue)
        seen_queues.update(re.findall(r'"taskQueue":\s*\{\s*"name":\s*"([^"]+)"', text))
        for secret in secrets:
            assert secret not in attributes and secret not in memo
    assert seen_queues  # the queues were found, and none carries a secret
    for queue in seen_queues:
        assert all(secret not in queue for secret in secrets), queue
    assert task_queue(hospital.region, hospital.control_queue) in seen_queues

    # The same history, through Lethe's codec and revealed, does show the subject: the test
    # looks in the right place.
    shown = await hospital.lethe(
        "audit", "history", workflow_id, "--json", "--reveal", "--by", "e2e", "--reason", "test"
    )
    assert shown.code == 0, str(shown)
    started = shown.json()[0]
    assert started["type"] == "workflow_execution_started"
    subject = started["payloads"][0]["request"]["subject"]
    assert subject["subject_id"] == patient.patient_id
    assert subject["identities"] == {"email": patient.email}

    # Nor does the worker's log name the subject.
    log = worker.log_text()
    assert "polling" in log
    for secret in secrets:
        assert secret not in log


async def test_audit_history_hides_the_subject_unless_revealed_on_the_record(
    hospital: Hospital, worker: WorkerProcess
) -> None:
    """Markers by default, in the table and in JSON; `--reveal` shows the
    identifiers only with a reason, and the ledger says who asked and why (and not who)."""
    patient = hospital.patients[2]
    secrets = (patient.patient_id, patient.email)
    workflow_id = await erase_and_wait_for_approval(hospital, patient)
    await approve(hospital, workflow_id)
    certificate = await asyncio.wait_for((await hospital.sdk()).result(workflow_id), 90)
    wide = {**hospital.env, "COLUMNS": "1000"}  # a table row on one line: nothing is split

    table, *as_json = await asyncio.gather(
        run_lethe(wide, "audit", "history", workflow_id),
        hospital.lethe("audit", "history", workflow_id, "--json"),
    )
    for shown in (table, *as_json):
        assert shown.code == 0, str(shown)
        for secret in secrets:
            assert secret not in shown.stdout, f"{secret!r} in {shown.args}"
            assert secret not in shown.stderr
    assert "[subject id]" in table.stdout  # the markers are printed, not taken for markup
    started = as_json[0].json()[0]
    assert started["type"] == "workflow_execution_started"
    assert started["payloads"][0]["request"]["subject"] == {
        "tenant": hospital.tenant,
        "subject_id": "[subject id]",
        "identities": {"email": "[identity email]"},
    }
    assert started["payloads"][0]["subject_ref"] == hospital.ref(patient)
    # Each step's request (scheduled on the region's queue) carries the subject: marked too.
    steps = [e for e in as_json[0].json() if e["type"] == "activity_task_scheduled"]
    assert steps
    for step in steps:
        assert '"subject_id": "[subject id]"' in json.dumps(step["payloads"]), step

    refused = await hospital.lethe("audit", "history", workflow_id, "--reveal", "--by", "jane")
    assert refused.code == 2, str(refused)
    assert "--reveal needs --reason" in refused.stderr
    assert all(secret not in refused.stdout for secret in secrets)

    reveal = ("audit", "history", workflow_id, "--reveal")
    revealed, revealed_table = await asyncio.gather(
        hospital.lethe(
            *reveal, "--json", "--by", "auditor-jane", "--reason", "checking the request's identity"
        ),
        run_lethe(wide, *reveal, "--by", "auditor-omar", "--reason", "second look"),
    )
    assert revealed.code == 0, str(revealed)
    assert "recorded in the ledger" in revealed.stderr
    subject = revealed.json()[0]["payloads"][0]["request"]["subject"]
    assert subject["subject_id"] == patient.patient_id
    assert subject["identities"] == {"email": patient.email}
    assert revealed_table.code == 0, str(revealed_table)
    assert patient.patient_id in revealed_table.stdout

    entries = await ledger.entries(await engine_for(hospital.store_url), certificate.request_id)
    reveals = {e.actor: e for e in entries if e.action == "history.revealed"}
    assert set(reveals) == {"auditor-jane", "auditor-omar"}
    jane = reveals["auditor-jane"]
    assert jane.subject_ref == hospital.ref(patient)
    assert jane.details["reason"] == "checking the request's identity"
    assert jane.details["workflow_id"] == workflow_id
    for entry in reveals.values():
        for secret in secrets:
            assert secret not in entry.model_dump_json()
    verified = await hospital.lethe("audit", "verify")
    assert verified.code == 0 and "ledger intact" in verified.stdout, str(verified)
