"""A crypto-shredding step in the erasure workflow: its evidence reaches the hash-chained ledger.

The key-store connector is a stand-in (see test_erasure.py); its real counterpart is tested in
tests/integration/test_shred.py. The histories recorded here are the replay tests' record of an
erasure with a shred step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from lethe.contracts import ApprovalDecision
from lethe.evidence import ledger
from lethe.evidence.store import engine_for
from lethe.workflows.erasure import ErasureWorkflow
from tests.workflows.test_erasure import (
    ROOT,
    Calls,
    _begin,
    _finish,
    _start,
    _wait_state,
    calls,
    store_env,
)

__all__ = ["calls", "store_env"]  # fixtures, shared with test_erasure.py

KEYS_SYSTEM = """\
  - name: patient-keys
    kind: keys
    region: eu
    connection: LETHE_KEYS_STORE_URL
    categories: [user.contact, user.health_and_medical]
"""
EVIDENCE: dict[str, str | int] = {
    "versions_destroyed": 2,
    "canary": "c2hyZWRkZWQtY2FuYXJ5",
    "canary_kept": "yes",
}


async def test_a_shred_step_leaves_its_evidence_in_the_ledger(
    time_skipping_env: WorkflowEnvironment,
    calls: Calls,
    store_env: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sample map with a key store: the plan shreds the subject's keys in the immediate
    phase, and the step's ledger entry carries what the connector proved."""
    datamap = tmp_path / "datamap.yaml"
    datamap.write_text((ROOT / "examples" / "datamap.yaml").read_text() + KEYS_SYSTEM)
    monkeypatch.setenv("LETHE_DATAMAP", str(datamap))
    calls.evidence["patient-keys"] = EVIDENCE
    start = _start(await time_skipping_env.get_current_time())
    handle = await _begin(time_skipping_env, start)
    await _wait_state(handle, "awaiting_approval")
    await handle.signal(ErasureWorkflow.approve, ApprovalDecision(by="dpo@st-mary"))
    certificate = await _finish(
        time_skipping_env, handle, "a_shred_step_leaves_its_evidence_in_the_ledger"
    )

    assert certificate.outcome == "erased"
    (shred,) = [s for s in certificate.plan.steps if s.action == "shred"]
    assert shred.system == "patient-keys" and shred.phase == "immediate"
    assert shred.id in dict(calls.erased)
    written = await ledger.entries(await engine_for(store_env), start.request_id)
    (entry,) = [e for e in written if e.details.get("step") == shred.id]
    assert entry.action == "step.done" and entry.system == "patient-keys"
    assert {k: entry.details[f"evidence.{k}"] for k in EVIDENCE} == EVIDENCE
    # Only the shred step's entry carries evidence.
    others = [e for e in written if e.details.get("step") not in (None, shred.id)]
    assert others and not any(k.startswith("evidence.") for e in others for k in e.details)
