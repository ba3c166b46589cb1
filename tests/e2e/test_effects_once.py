"""A worker that dies right after a step's effect, before the activity completes: the retry on
another worker must not make the effect a second time, and the certificate must show the first.

The dying worker is worker.py run by tests/e2e/crash_after_effect.py, which wraps the
connector's method that makes the effect so the process ends (`os._exit(9)`) as soon as it
returns. Temporal retries the activity once its heartbeat timeout (a minute) has passed, on a
normal worker started meanwhile. Each kind of system is one `Effect`: the method to end after,
and how the system itself shows the effect happened once and matches the evidence.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from examples.seed import Patient
from tests.e2e.conftest import (
    Hospital,
    approve,
    certificate_of,
    erase_and_wait_for_approval,
    kafka_records,
)
from tests.e2e.crash_after_effect import CRASH_AFTER, EXIT_CODE, MARKER

CRASH_SCRIPT = "tests/e2e/crash_after_effect.py"
CRASH_TIMEOUT = 120.0
"""From approval until the dying worker has made the effect and ended."""
COMPLETION_TIMEOUT = 240.0
"""From the normal worker's start until the erasure completes (the retry waits out the
activity's heartbeat timeout first)."""

Outcome = dict[str, Any]
"""One step's outcome as `lethe certificate --json` shows it."""


@dataclass(frozen=True)
class Effect:
    """One kind of system's effect: where the worker dies, and how to check it happened once."""

    kind: str
    """The data map's system kind (`sql`, `kafka`, `redis`, `blob`, `logs`, `keys`)."""
    crash_after: str
    """`module:Class.method` that makes the effect; the worker ends once it has returned."""
    once: Callable[[Hospital, Patient, Outcome], Awaitable[None]]
    """Asserts, with the system's own client, one effect for the patient that the step's
    outcome (its evidence) matches."""


async def _one_tombstone(hospital: Hospital, patient: Patient, outcome: Outcome) -> None:
    key = f"patient:{patient.patient_id}".encode()
    records = await asyncio.to_thread(
        kafka_records, hospital.connections.kafka_bootstrap, hospital.topic
    )
    tombstones = [(p, o) for p, o, k, v in records if k == key and v is None]
    assert len(tombstones) == 1, tombstones
    evidence = outcome["evidence"]
    assert (evidence["partition"], evidence["offset"]) == tombstones[0], evidence
    assert evidence["tombstone_reused"] is True, evidence  # the retry found the first one


EFFECTS = [
    Effect("kafka", "activities.kafka:TombstoneWriter._produce_tombstone", _one_tombstone),
]


def _outcome(certificate: dict[str, Any], kind: str) -> Outcome:
    """The certificate's outcome of the plan's one step of `kind`."""
    step_ids = [
        step["id"]
        for region in certificate["plan"]["regions"]
        for step in region["steps"]
        if step["kind"] == kind
    ]
    assert len(step_ids) == 1, step_ids
    outcomes = [s for s in certificate["steps"] if s["step_id"] == step_ids[0]]
    assert len(outcomes) == 1, certificate["steps"]
    found: Outcome = outcomes[0]
    return found


@pytest.mark.parametrize("effect", EFFECTS, ids=[effect.kind for effect in EFFECTS])
async def test_an_effect_is_made_once_when_the_worker_dies_right_after_it(
    hospital: Hospital, effect: Effect
) -> None:
    """Erase a patient on a worker that dies right after the effect; a new one completes it."""
    patient = hospital.patients[EFFECTS.index(effect)]  # a patient of its own per kind
    dying = hospital.worker()
    dying.script = CRASH_SCRIPT
    dying.env = {**dying.env, CRASH_AFTER: effect.crash_after}
    normal = hospital.worker()
    try:
        await dying.start()
        workflow_id = await erase_and_wait_for_approval(hospital, patient)
        await approve(hospital, workflow_id)
        assert dying.process is not None
        code = await asyncio.wait_for(dying.process.wait(), CRASH_TIMEOUT)
        assert code == EXIT_CODE, dying.log_text()[-3000:]
        assert MARKER in dying.log_text()

        await normal.start()
        await asyncio.wait_for((await hospital.sdk()).result(workflow_id), COMPLETION_TIMEOUT)
        certificate = await certificate_of(hospital, workflow_id)

        await effect.once(hospital, patient, _outcome(certificate, effect.kind))
        step_ids = [s["step_id"] for s in certificate["steps"]]
        assert len(step_ids) == len(set(step_ids)), step_ids  # each step once
    finally:
        # The next kind's dying worker must be the only one serving the region.
        await normal.stop()
        await dying.stop()
