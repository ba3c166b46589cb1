"""`lethe audit history` redacts the subject out of decrypted payloads, wherever they hold them."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta

from temporalio.api.common.v1 import Payload, Payloads
from temporalio.api.history.v1 import HistoryEvent, MarkerRecordedEventAttributes

from lethe.classification.datamap import RedisLocator
from lethe.contracts import ErasureRequest, ErasureStart, RegionJob, StepOutcome, Subject
from lethe.temporal.history import (
    SUBJECT_ID_MARK,
    identity_mark,
    iter_payloads,
    redact,
    redact_text,
    request_of,
    subject_markers,
)
from tests.steps import step, step_request

NOW = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)
PATIENT = "pt-7f3a9c-ada"
EMAIL = "ada.lovelace@st-mary.example"
MRN = "MRN-20261102"
REF = "a" * 32
SUBJECT = Subject(tenant="st-mary", subject_id=PATIENT, identities={"email": EMAIL, "mrn": MRN})
STEP = step(
    RedisLocator(patterns=["session:{subject_id}"], categories=["user.contact"]),
    action="purge",
    system="sessions",
    connection="SESSIONS_URL",
)


def _start() -> object:
    """The erasure workflow's input as the JSON converter writes it."""
    request = ErasureRequest(subject=SUBJECT, reason="Art. 17 by letter", requested_by="clerk")
    start = ErasureStart(request_id="req-1", subject_ref=REF, request=request, received_at=NOW)
    return start.model_dump(mode="json")


def _region_job() -> object:
    job = RegionJob(
        request_id="req-1",
        subject_ref=REF,
        subject=SUBJECT,
        steps=[STEP],
        erasure_started_at=NOW,
        window_ends_at=NOW + timedelta(days=30),
        erased={"sessions/0": StepOutcome(step_id="sessions/0", status="done")},
    )
    return job.model_dump(mode="json")


def _step_request() -> object:
    request = step_request(STEP, subject=SUBJECT, subject_ref=REF, started=NOW)
    return request.model_dump(mode="json")


def _shown(value: object) -> str:
    return json.dumps(value)


def test_every_subject_in_every_kind_of_payload_becomes_markers() -> None:
    payloads = [_start(), _region_job(), _step_request()]
    markers = subject_markers(payloads)
    assert markers == {
        PATIENT: SUBJECT_ID_MARK,
        EMAIL: identity_mark("email"),
        MRN: identity_mark("mrn"),
    }
    redacted = redact(payloads, markers)
    text = _shown(redacted)
    for secret in (PATIENT, EMAIL, MRN):
        assert secret not in text
    assert isinstance(redacted, list)
    start, job, step = redacted
    expected = {
        "tenant": "st-mary",
        "subject_id": "[subject id]",
        "identities": {"email": "[identity email]", "mrn": "[identity mrn]"},
    }
    assert start["request"]["subject"] == expected
    assert job["subject"] == expected
    assert step["subject"] == expected
    # Everything else is as it was: the history still says what happened.
    assert start["request_id"] == "req-1"
    assert start["subject_ref"] == REF
    assert start["request"]["requested_by"] == "clerk"
    assert start["request"]["reason"] == "Art. 17 by letter"
    assert job["steps"][0]["locator"]["patterns"] == ["session:{subject_id}"]
    assert job["erased"]["sessions/0"]["status"] == "done"


def test_a_copy_of_an_identifier_elsewhere_is_redacted_too() -> None:
    markers = subject_markers([_start()])
    other = {
        "note": PATIENT,
        EMAIL: "a mapping key",
        "list": [MRN, "kept"],
        "failure": {"message": f"KeyError: '{PATIENT}' while mailing {EMAIL}", "count": 3},
    }
    redacted = redact(other, markers)
    assert redacted == {
        "note": "[subject id]",
        "[identity email]": "a mapping key",
        "list": ["[identity mrn]", "kept"],
        "failure": {
            "message": "KeyError: '[subject id]' while mailing [identity email]",
            "count": 3,
        },
    }


def test_the_payloads_given_are_left_as_they_were() -> None:
    payloads = [_start(), {"note": PATIENT}]
    before = copy.deepcopy(payloads)
    redact(payloads, subject_markers(payloads))
    assert payloads == before


def test_a_short_id_is_replaced_whole_but_not_inside_other_words() -> None:
    markers = subject_markers([{"tenant": "t", "subject_id": "p-1", "identities": {}}])
    assert redact_text("p-1", markers) == SUBJECT_ID_MARK
    assert redact_text("step-1 of p-12", markers) == "step-1 of p-12"


def test_the_longest_identifier_is_replaced_first() -> None:
    """An email that contains the subject id becomes the email's marker, not a mixture."""
    subject = {"tenant": "t", "subject_id": "ada.lovelace", "identities": {"email": EMAIL}}
    markers = subject_markers([subject])
    assert redact_text(f"wrote to {EMAIL}", markers) == "wrote to [identity email]"
    assert redact_text("ada.lovelace logged in", markers) == "[subject id] logged in"


def test_an_id_that_is_also_an_identity_is_marked_as_the_id() -> None:
    subject = {"tenant": "t", "subject_id": EMAIL, "identities": {"email": EMAIL}}
    assert subject_markers([subject]) == {EMAIL: SUBJECT_ID_MARK}


def test_without_a_subject_nothing_changes() -> None:
    payloads = [{"request_id": "key-rotation", "versions": [1, 2]}, "text", None, 3.5]
    markers = subject_markers(payloads)
    assert markers == {}
    assert redact(payloads, markers) == payloads


def test_the_request_and_reference_come_from_the_payloads() -> None:
    assert request_of([None, _step_request()]) == ("req-1", REF)
    assert request_of([_start()]) == ("req-1", REF)
    assert request_of([{"outcome": "erased"}]) is None


def test_the_sdks_patch_markers_are_bookkeeping() -> None:
    """`workflow.patched` writes its patch id in clear: not a payload of the workflow's data."""
    plain = Payload(metadata={"encoding": b"json/plain"}, data=b'{"id":"p","deprecated":false}')
    sealed = Payload(metadata={"encoding": b"binary/encrypted"}, data=b"...")
    patch = HistoryEvent(
        marker_recorded_event_attributes=MarkerRecordedEventAttributes(
            marker_name="core_patch", details={"patch-data": Payloads(payloads=[plain])}
        )
    )
    local = HistoryEvent(
        marker_recorded_event_attributes=MarkerRecordedEventAttributes(
            marker_name="core_local_activity",
            details={"data": Payloads(payloads=[plain]), "result": Payloads(payloads=[sealed])},
        )
    )
    assert list(iter_payloads(patch)) == [plain]
    assert list(iter_payloads(patch, user_only=True)) == []
    assert list(iter_payloads(local, user_only=True)) == [sealed]
