"""Replay: recorded histories of the erasure workflows replay without non-determinism errors.

The histories under histories/ were recorded from the erasure and key-rotation tests with
`LETHE_RECORD_HISTORIES=1`, one folder per shape of the workflows (before-patches-first: runs
that decided each patch where it applied; patches-first: runs that decide them all at once,
with a child workflow per region; steps-from-parent: runs that schedule their steps on the
regions' queues themselves; key-rotation: the four runs of a rotation that continues as new
three times; bulk-one-batch-at-a-time: bulk requests that took one batch at a time, each run of
them; bulk-batches-overlap: bulk requests that take the next batch and record the last while one
erases). A
change to the workflows that would break runs already in flight fails here; record a new folder
only for a deliberate, versioned change (workflow.patched), and keep the old ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from lethe.codec import converter as codec
from lethe.workflows.bulk_erasure import BulkErasureWorkflow
from lethe.workflows.erasure import ErasureWorkflow
from lethe.workflows.key_rotation import KeyRotationWorkflow
from lethe.workflows.regional_erasure import RegionalErasureWorkflow

FOLDER = Path(__file__).parent / "histories"
HISTORIES = sorted(FOLDER.rglob("*.json"))


def test_histories_were_recorded() -> None:
    folders = {path.parent.name for path in HISTORIES}
    assert folders == {
        "before-patches-first",
        "patches-first",
        "steps-from-parent",
        "key-rotation",
        "bulk-one-batch-at-a-time",
        "bulk-batches-overlap",
    }
    assert len(HISTORIES) >= 16
    assert any(".child" in path.name for path in HISTORIES)
    # A shred step in both shapes of the erasure, and a rotation that crossed continue-as-new.
    shredded = [p for p in HISTORIES if p.name.startswith("a_shred_step")]
    assert {p.parent.name for p in shredded} == {
        "before-patches-first",
        "patches-first",
        "steps-from-parent",
    }
    assert len([p for p in HISTORIES if p.parent.name == "key-rotation"]) >= 2
    for shape in ("bulk-one-batch-at-a-time", "bulk-batches-overlap"):
        bulk = [p.name for p in HISTORIES if p.parent.name == shape]
        assert "batch_by_batch.run1.json" in bulk and "offboarding.run0.json" in bulk


def _load(path: Path) -> WorkflowHistory:
    recorded = json.loads(path.read_text())
    return WorkflowHistory.from_json(recorded.pop("workflowId"), recorded)


@pytest.mark.parametrize(
    "path", HISTORIES, ids=[str(path.relative_to(FOLDER).with_suffix("")) for path in HISTORIES]
)
async def test_recorded_history_replays(path: Path, test_codec: codec.EncryptionCodec) -> None:
    replayer = Replayer(
        workflows=[
            ErasureWorkflow,
            RegionalErasureWorkflow,
            KeyRotationWorkflow,
            BulkErasureWorkflow,
        ],
        data_converter=codec.data_converter(test_codec),
    )
    history = _load(path)
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, result.replay_failure
