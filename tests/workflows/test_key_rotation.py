"""The key-rotation workflow under time skipping, with the real activities on SQLite stores.

100,000 data keys are rotated in runs of 30,000 (so the workflow continues as new three times),
the grace period of a week passes in skipped time, and a second start joins the first. The key
store logs every rewrap it commits (tests/data_keys.py), so "each key exactly once" is read
from the database, not from the workflow's own counts.
"""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from lethe.activities.key_rotation import KeyRotations
from lethe.contracts import Subject
from lethe.evidence import ledger
from lethe.evidence.store import engine_for
from lethe.kernel.config import Settings, current_settings
from lethe.kernel.database import dispose_all
from lethe.keys.rotation import KIND, RotationRequest
from lethe.keys.service import KeyService, open_key_service, place
from lethe.sdk.rotation import rotation_progress, start_rotation
from lethe.temporal import search_attributes as sa
from lethe.workflows.key_rotation import KeyRotationWorkflow
from tests.data_keys import TENANT, log_rewraps, rewraps, seed_data_keys, subject_id
from tests.workflows.test_erasure import save_history

QUEUE = "lethe-rotation-test"
KEYS = 100_000
PER_RUN = 30_000
WHERE = place("sql", "patients", "email")
HISTORIES = Path(__file__).parent / "histories" / "key-rotation"
"""Where LETHE_RECORD_HISTORIES=1 records each run of the rotation, for the replay tests."""


@pytest.fixture
async def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Settings]:
    """The activities' settings: a key store and a Lethe store of this test's own."""
    monkeypatch.setenv("LETHE_KEYS_STORE_URL", f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}")
    monkeypatch.setenv("LETHE_STORE_URL", f"sqlite+aiosqlite:///{tmp_path / 'lethe.db'}")
    monkeypatch.setenv("LETHE_KEYS_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())
    monkeypatch.setenv("LETHE_SUBJECT_KEY", base64.b64encode(os.urandom(32)).decode())
    monkeypatch.setenv("LETHE_KEYS_CACHE_SECONDS", "60")
    monkeypatch.setenv("LETHE_CONTROL_QUEUE", QUEUE)
    yield current_settings()
    await dispose_all()


async def _fresh(settings: Settings) -> KeyService:
    """A key service with empty caches, as another process has it."""
    return await open_key_service(settings.model_copy(update={"keys_cache_seconds": 0.0}))


async def _runs(
    env: WorkflowEnvironment, workflow_id: str, first_run_id: str | None
) -> list[WorkflowHistory]:
    """The histories of a workflow's runs, following continue-as-new from the first."""
    histories = []
    run_id = first_run_id
    while run_id:
        history = await env.client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        histories.append(history)
        last = history.events[-1]
        attributes = last.workflow_execution_continued_as_new_event_attributes
        run_id = (
            attributes.new_execution_run_id
            if last.HasField("workflow_execution_continued_as_new_event_attributes")
            else None
        )
    return histories


@pytest.mark.timeout(240)
async def test_rotating_100000_data_keys_across_runs(
    time_skipping_env: WorkflowEnvironment, settings: Settings
) -> None:
    keys = await open_key_service(settings)
    assert await seed_data_keys(keys, KEYS) == 1
    sample = [Subject(tenant=TENANT, subject_id=subject_id(n)) for n in range(0, KEYS, 5000)]
    sealed = [await keys.encrypt(s, s.subject_id.encode(), WHERE) for s in sample]
    await log_rewraps(keys.engine)
    client = time_skipping_env.client
    request = RotationRequest(batch_size=2000, keys_per_run=PER_RUN, requested_by="dpo")

    async with Worker(
        client,
        task_queue=QUEUE,
        workflows=[KeyRotationWorkflow],
        activities=KeyRotations().activities(),
    ):
        handle, joined = await start_rotation(client, QUEUE, request)
        assert (handle.id, joined) == ("key-rotation-lethe-rotation-test", False)
        second = request.model_copy(update={"batch_size": 7, "requested_by": "someone else"})
        again, joined = await start_rotation(client, QUEUE, second)
        assert (again.id, joined) == (handle.id, True)
        assert (await again.describe()).run_id == handle.result_run_id  # the same run

        result = await handle.result()  # follows the runs; skips the settling and the grace
        progress = await rotation_progress(client, handle.id)
        described = await handle.describe()
        runs = await _runs(time_skipping_env, handle.id, handle.result_run_id)

    assert len(runs) == 4
    if os.environ.get("LETHE_RECORD_HISTORIES") == "1":
        HISTORIES.mkdir(parents=True, exist_ok=True)
        for index, history in enumerate(runs):
            save_history(HISTORIES / f"rotation.run{index}.json", handle.id, history)

    assert (result.target, result.retired) == (2, [1])
    assert result.runs == 4  # 30,000 + 30,000 + 30,000 + 10,000: continued as new three times
    assert (result.rewrapped, result.passes, result.resumes) == (KEYS, 1, 0)
    assert progress.phase == "done" and progress.runs == 4
    assert progress.grace_ends_at is not None
    assert progress.grace_ends_at - result.started_at >= timedelta(days=7)
    assert result.finished_at >= progress.grace_ends_at  # retired only after the grace period
    assert described.typed_search_attributes.get(sa.KIND) == KIND
    assert described.typed_search_attributes.get(sa.STATUS) == "done"

    fresh = await _fresh(settings)
    status = await fresh.status()
    assert status.data_keys_by_kek == {2: KEYS}
    assert [(v.version, v.state) for v in status.versions] == [(1, "retired"), (2, "current")]
    assert status.min_decrypt_version == 2
    log = await rewraps(fresh.engine)
    assert len(log) == KEYS and set(log.values()) == {1}  # every key, each exactly once
    assert {(old, new) for _, _, old, new in log} == {(1, 2)}
    opened = [await fresh.decrypt(value, WHERE, cached=False) for value in sealed]
    assert opened == [s.subject_id.encode() for s in sample]

    store = await engine_for(settings.store_url.get_secret_value())
    entries = await ledger.entries(store, result.rotation_id)
    assert [(e.action, e.details["version"], e.actor) for e in entries] == [
        ("kek.version_created", 2, "dpo"),
        ("kek.min_decrypt_raised", 2, "dpo"),
        ("kek.version_retired", 1, "dpo"),
    ]
    assert (await ledger.verify_chain(store)).intact
