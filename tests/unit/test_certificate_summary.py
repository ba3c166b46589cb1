"""The certificate says which kind of incomplete it is: failures with reasons, caveats, dates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from lethe.contracts import Certificate, StepOutcome
from tests.unit.test_planning import _plan

NOW = datetime(2026, 12, 3, tzinfo=UTC)


def _certificate(outcomes: dict[str, StepOutcome], outcome: str = "incomplete") -> Certificate:
    plan = _plan()
    return Certificate.model_validate(
        {
            "request_id": "req-1",
            "subject_ref": plan.subject_ref,
            "tenant": plan.tenant,
            "outcome": outcome,
            "policy": plan.policy,
            "datamap_digest": plan.datamap_digest,
            "requested_by": "dpo",
            "reason": "",
            "received_at": NOW,
            "deadline": NOW + timedelta(days=31),
            "completed_at": NOW,
            "plan": plan,
            "steps": [
                outcomes.get(s.id, StepOutcome(step_id=s.id, status="done", verified=True))
                for s in plan.steps
            ],
        }
    )


def test_a_failure_and_a_caveat_read_differently() -> None:
    gone_by = NOW + timedelta(days=40)
    certificate = _certificate(
        {
            "patients-db/0": StepOutcome(
                step_id="patients-db/0",
                status="failed",
                detail="SchemaMismatch: table 'patients' has no column 'email'",
            ),
            "patient-events/0": StepOutcome(
                step_id="patient-events/0",
                status="at_risk",
                gone_by=gone_by,
                detail="earlier records are gone only after the window",
            ),
        }
    )
    lines = certificate.summary()
    assert lines[0] == "incomplete: 1 step(s) failed, 1 with a caveat"
    missing = "SchemaMismatch: table 'patients' has no column 'email'"
    assert lines[1] == f"failed patients-db/0: {missing}"
    assert lines[2].startswith(f"at_risk patient-events/0: gone by {gone_by.isoformat()}")


def test_an_unreachable_system_says_so_and_a_clean_erasure_is_one_line() -> None:
    down = StepOutcome(
        step_id="session-cache/0",
        status="failed",
        detail="ServiceUnavailable: Redis at 127.0.0.1:56379: ConnectionError",
    )
    lines = _certificate({"session-cache/0": down}).summary()
    assert lines == [
        "incomplete: 1 step(s) failed",
        "failed session-cache/0: ServiceUnavailable: Redis at 127.0.0.1:56379: ConnectionError",
    ]
    assert _certificate({}, "erased").summary() == ["erased"]
