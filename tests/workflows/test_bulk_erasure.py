"""The bulk erasure workflow under time skipping, with the real activities on SQLite.

A clinic's visits table: the subjects of a file are erased batch after batch (the workflow
continues as new, its histories stay small), every other patient's rows are untouched, each
batch's Merkle root is in the ledger and sampled subjects' proofs hold; subjects under a legal
hold wait and go once it is released; subjects on the forget-list are skipped; a paused request
takes no batch until resumed, and a cancelled one stops with what ran certified. The database is
read back with SQL: the workflow's counts are checked against it, not trusted.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select
from sqlalchemy.ext.asyncio import create_async_engine
from temporalio.client import WorkflowHandle, WorkflowHistory
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from lethe.activities import bulk as bulk_activities
from lethe.activities import ledger as control
from lethe.activities.clients import Clients
from lethe.activities.connectors import Connectors
from lethe.contracts import ApprovalDecision, BulkProgress, ErasureRequest, Subject
from lethe.evidence import bulk, forget_list, ledger
from lethe.evidence.store import engine_for
from lethe.kernel.config import Settings, current_settings
from lethe.kernel.database import dispose_all
from lethe.kernel.subjects import subject_ref
from lethe.sdk import bulk as bulk_sdk
from lethe.sdk.client import Client
from lethe.workflows.bulk_erasure import BulkErasureWorkflow
from tests.workflows.test_erasure import save_history

HISTORIES = Path(__file__).parent / "histories" / "bulk-batches-overlap"
"""Where LETHE_RECORD_HISTORIES=1 records each run of a bulk request: one folder per shape."""
CONTROL = "bulktest-control"
REGION_QUEUE = "bulktest-eu"
TENANT = "st-mary"

DATAMAP = """
version: 1
regions: [eu]
tenants:
  st-mary: {region: eu}
systems:
  - name: clinic-db
    kind: sql
    region: eu
    connection: LETHE_TEST_CLINIC_URL
    tables:
      - table: visits
        subject_column: patient_id
        columns:
          note: user.contact.email
"""
PACK = """
name: bulktest
version: "1"
erasure:
  default: {strategy: delete, citation: "GDPR Art. 17(1)"}
  deadline_months: 1
  window: 30d
"""

visits = Table(
    "visits",
    MetaData(),
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("patient_id", String(64), nullable=False),
    Column("note", String(200), nullable=False),
)


@pytest.fixture
async def setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Settings, str]]:
    """A clinic database and a Lethe store of this test's own; the data map and pack."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'clinic.db'}"
    (tmp_path / "datamap.yaml").write_text(DATAMAP)
    (tmp_path / "pack.yaml").write_text(PACK)
    monkeypatch.setenv("LETHE_TEST_CLINIC_URL", url)
    monkeypatch.setenv("LETHE_STORE_URL", f"sqlite+aiosqlite:///{tmp_path / 'lethe.db'}")
    monkeypatch.setenv("LETHE_DATAMAP", str(tmp_path / "datamap.yaml"))
    monkeypatch.setenv("LETHE_POLICY", str(tmp_path / "pack.yaml"))
    monkeypatch.setenv("LETHE_SUBJECT_KEY", base64.b64encode(os.urandom(32)).decode())
    monkeypatch.setenv("LETHE_KEYS_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())
    monkeypatch.setenv("LETHE_CONTROL_QUEUE", CONTROL)
    rows = [
        {"id": n, "patient_id": f"p-{n % 300}", "note": f"visit {n}"} for n in range(600)
    ]  # 300 patients, two visits each
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(visits.metadata.create_all)
        await conn.execute(insert(visits), rows)
    await engine.dispose()
    yield current_settings(), url
    await dispose_all()


async def _rows(url: str) -> dict[int, tuple[Any, ...]]:
    engine = create_async_engine(url)
    async with engine.connect() as conn:
        found = {row.id: tuple(row) for row in await conn.execute(select(visits))}
    await engine.dispose()
    return found


def _subjects_file(path: Path, ids: list[str]) -> Path:
    path.write_text("subject_id\n" + "".join(f"{i}\n" for i in ids))
    return path


@contextlib.asynccontextmanager
async def _running(env: WorkflowEnvironment) -> AsyncIterator[None]:
    """A control worker and region eu's worker, as `lethe worker --control` makes them."""
    async with Clients() as clients:
        control_worker = Worker(
            env.client,
            task_queue=CONTROL,
            workflows=[BulkErasureWorkflow],
            activities=[
                bulk_activities.plan_bulk,
                bulk_activities.stage_found,
                bulk_activities.next_batch,
                bulk_activities.record_batch,
                bulk_activities.next_recheck,
                bulk_activities.record_recheck,
                bulk_activities.finish,
                control.record,
            ],
        )
        regional = Worker(
            env.client, task_queue=REGION_QUEUE, activities=list(Connectors(clients).activities())
        )
        async with control_worker, regional:
            yield


async def _runs(env: WorkflowEnvironment, workflow_id: str) -> list[WorkflowHistory]:
    """Each run's history, from the last run back through each one it continued."""
    histories, run_id = [], None
    while True:
        history = await env.client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        histories.append(history)
        started = history.events[0].workflow_execution_started_event_attributes
        if not started.continued_execution_run_id:
            return histories
        run_id = started.continued_execution_run_id


async def _events_per_run(env: WorkflowEnvironment, workflow_id: str) -> list[int]:
    """Each run's history length, from the last run back."""
    return [len(history.events) for history in await _runs(env, workflow_id)]


def _recorded_after_next_started(history: WorkflowHistory) -> int:
    """How many batches were recorded (`bulk.record_batch`) only after the next batch's
    `erase_batch` activities were scheduled (activity ids `<batch>-<step>`)."""
    first: int | None = None  # the run's first batch (a run continued as new goes on counting)
    scheduled, records, overlapped = -1, 0, 0
    for event in history.events:
        if event.HasField("activity_task_scheduled_event_attributes"):
            number, dash, _ = event.activity_task_scheduled_event_attributes.activity_id.partition(
                "-"
            )
            if dash and number.isdigit():  # not the preflight's (a plain sequence number)
                first = int(number) if first is None else first
                scheduled = max(scheduled, int(number) - first)
        elif event.HasField("marker_recorded_event_attributes"):
            details = event.marker_recorded_event_attributes.details
            if "data" not in details:  # a patch's marker
                continue
            meta = json.loads(details["data"].payloads[0].data)
            if meta.get("activity_type") == "bulk.record_batch":
                overlapped += scheduled > records
                records += 1
    return overlapped


async def _keep_histories(env: WorkflowEnvironment, workflow_id: str, name: str) -> None:
    """With LETHE_RECORD_HISTORIES=1, save every run of the request for the replay tests."""
    if os.environ.get("LETHE_RECORD_HISTORIES") != "1":
        return
    HISTORIES.mkdir(parents=True, exist_ok=True)
    for index, history in enumerate(reversed(await _runs(env, workflow_id))):
        save_history(HISTORIES / f"{name}.run{index}.json", workflow_id, history)


@pytest.mark.timeout(240)
async def test_a_bulk_erasure_erases_the_files_subjects_batch_by_batch_with_proofs(
    time_skipping_env: WorkflowEnvironment, setup: tuple[Settings, str], tmp_path: Path
) -> None:
    settings, url = setup
    before = await _rows(url)
    targets = [f"p-{n}" for n in range(250)]
    client = Client(time_skipping_env.client, settings)
    async with _running(time_skipping_env):
        bulk_id = await bulk_sdk.submit(
            client,
            tenant=TENANT,
            subjects=_subjects_file(tmp_path / "subjects.csv", targets),
            requested_by="dpo",
            reason="clinic closes its patient portal",
            batch_size=40,
            batches_per_run=2,
        )
        handle: WorkflowHandle[Any, Any] = time_skipping_env.client.get_workflow_handle(bulk_id)
        done = BulkProgress.model_validate(await handle.result())
        runs = await _events_per_run(time_skipping_env, bulk_id)
        overlapped = sum(map(_recorded_after_next_started, await _runs(time_skipping_env, bulk_id)))
        await _keep_histories(time_skipping_env, bulk_id, "batch_by_batch")

    after = await _rows(url)
    kept = {i: row for i, row in before.items() if row[1] not in set(targets)}
    assert after == kept  # every target's rows gone, every other row byte-identical
    assert len(kept) == 100
    assert done.state == "completed"
    assert (done.counts.total, done.counts.erased, done.counts.failed) == (250, 250, 0)
    (step,) = done.steps
    assert step.affected == 500 and step.statuses == {"done": 250}
    assert done.batches == 7  # 250 in batches of 40
    assert len(runs) >= 2 and max(runs) < 400  # continued as new; no history grows with the file
    # A batch was recorded while the next one erased (each run's last is recorded after).
    assert overlapped >= 7 - len(runs), overlapped

    store = await engine_for(settings.store_url.get_secret_value())
    entries = [e for e in await ledger.entries(store) if e.request_id == bulk_id]
    roots = [e for e in entries if e.action == "bulk.batch"]
    assert len(roots) == 7 and all(e.subject_ref == "-" for e in entries)
    assert [e.action for e in entries][-1] == "bulk.completed"
    # The workflow's own entries carry the tenant (a batch's entry is lethe.evidence.bulk's).
    assert {e.tenant for e in entries if e.action != "bulk.batch"} == {TENANT}
    assert await bulk.verify_bulk(store, bulk_id) == []
    batch_roots = await bulk_sdk.roots(client, bulk_id)  # what the bulk certificate lists
    assert [(r.batch, r.root, r.ledger_hash) for r in batch_roots] == [
        (e.details["batch"], e.details["root"], e.hash) for e in roots
    ]
    assert sum(r.size for r in batch_roots) == 250
    for subject_id in ("p-0", "p-133", "p-249"):
        (proof,) = await bulk_sdk.subject_proofs(client, TENANT, subject_id)
        assert proof.status == "done" and proof.affected == 2
        assert bulk.check_proof(proof)
        assert proof.root in {e.details["root"] for e in roots}
    listed = {e.subject_ref for e in await forget_list.entries(store)}
    key = settings.subject_key_bytes
    assert {subject_ref(TENANT, s, key) for s in targets} <= listed
    assert subject_ref(TENANT, "p-299", key) not in listed


@pytest.mark.timeout(240)
async def test_held_subjects_wait_erased_ones_are_skipped_and_running_ones_joined(
    local_env: WorkflowEnvironment, setup: tuple[Settings, str], tmp_path: Path
) -> None:
    """On the dev server: releasing a hold finds the waiting request in visibility and wakes
    it (the time-skipping server has no visibility queries)."""
    settings, url = setup
    client = Client(local_env.client, settings)
    store = await engine_for(settings.store_url.get_secret_value())
    key = settings.subject_key_bytes
    erased_before = "p-7"
    await forget_list.add(
        store,
        subject=Subject(tenant=TENANT, subject_id=erased_before),
        subject_ref=subject_ref(TENANT, erased_before, key),
        request_id="req-earlier",
        systems=["clinic-db"],
        subject_key=key,
    )
    held = ["p-3", "p-11"]
    hold = await client.place_hold(
        matter="litigation 42",
        scope="subject",
        value=subject_ref(TENANT, held[0], key),
        placed_by="legal",
        reason="litigation",
    )
    other_hold = await client.place_hold(
        matter="litigation 43",
        scope="subject",
        value=subject_ref(TENANT, held[1], key),
        placed_by="legal",
        reason="litigation",
    )
    # A single request for p-5 is running (no worker runs its workflow here): the bulk joins it.
    single = await client.erase(
        ErasureRequest(subject=Subject(tenant=TENANT, subject_id="p-5"), requested_by="dpo")
    )
    targets = [f"p-{n}" for n in range(20)]
    async with _running(local_env):
        bulk_id = await bulk_sdk.submit(
            client,
            tenant=TENANT,
            subjects=_subjects_file(tmp_path / "subjects.csv", targets),
            requested_by="dpo",
            batch_size=8,
        )
        waiting = await bulk_sdk.follow(client, bulk_id, settled=("on_hold",), every=0.2)
        assert waiting.phase == "held"
        counts = waiting.counts
        assert (counts.erased, counts.held, counts.skipped, counts.joined) == (16, 2, 1, 1)
        left = {row[1] for row in (await _rows(url)).values()}
        assert set(held) | {erased_before, "p-5"} <= left  # held, skipped, joined: untouched
        await client.release_hold(hold.id, released_by="legal")
        await client.release_hold(other_hold.id, released_by="legal")
        done = await bulk_sdk.follow(client, bulk_id, every=0.2)
        await _keep_histories(local_env, bulk_id, "held_skipped_joined")

    await local_env.client.get_workflow_handle(single.workflow_id).terminate()
    listed = await bulk_sdk.recent(client, tenant=TENANT)  # `lethe bulk list`
    assert (bulk_id, TENANT) in [(b.bulk_id, b.tenant) for b in listed]
    with pytest.raises(bulk_sdk.BulkRefused):
        await bulk_sdk.recent(client, tenant="x' OR '1'='1")
    assert (done.counts.erased, done.counts.held, done.counts.skipped) == (18, 0, 1)
    assert done.counts.joined == 1
    left = {row[1] for row in (await _rows(url)).values()}
    # On the forget-list: not erased again here; joined: the single request erases p-5.
    assert left & set(targets) == {erased_before, "p-5"}
    assert await bulk.verify_bulk(store, bulk_id) == []


@pytest.mark.timeout(240)
async def test_a_paused_bulk_takes_no_batch_and_a_cancelled_one_keeps_what_ran(
    time_skipping_env: WorkflowEnvironment, setup: tuple[Settings, str], tmp_path: Path
) -> None:
    settings, url = setup
    client = Client(time_skipping_env.client, settings)
    targets = [f"p-{n}" for n in range(200)]
    async with _running(time_skipping_env):
        bulk_id = await bulk_sdk.submit(
            client,
            tenant=TENANT,
            subjects=_subjects_file(tmp_path / "subjects.csv", targets),
            requested_by="dpo",
            batch_size=10,
        )
        await bulk_sdk.signal(client, bulk_id, "pause", "dpo")
        paused = await bulk_sdk.follow(client, bulk_id, settled=("paused",), every=0.1)
        taken = paused.counts.erased
        assert taken < 200
        assert (await bulk_sdk.progress(client, bulk_id)).counts.erased == taken
        await bulk_sdk.signal(client, bulk_id, "cancel", "dpo")
        done = await bulk_sdk.follow(client, bulk_id, every=0.1)
        await _keep_histories(time_skipping_env, bulk_id, "paused_then_cancelled")

    assert done.state == "cancelled" and done.cancelled_by == "dpo"
    assert done.counts.erased == taken
    gone = set(targets) - {row[1] for row in (await _rows(url)).values()}
    assert len(gone) == taken  # exactly the batches that ran, no more
    store = await engine_for(settings.store_url.get_secret_value())
    assert await bulk.verify_bulk(store, bulk_id) == []
    actions = [e.action for e in await ledger.entries(store) if e.request_id == bulk_id]
    assert "bulk.paused" in actions and actions[-1] == "bulk.cancelled"


TWO_TENANTS = """
version: 1
regions: [eu]
tenants:
  st-mary: {region: eu}
  st-luke: {region: eu}
systems:
  - name: clinic-db
    kind: sql
    region: eu
    connection: LETHE_TEST_CLINIC_URL
    tables:
      - table: members
        subject_column: patient_id
        tenant_column: clinic
        identities: {email: email}
        columns:
          email: user.contact.email
"""

members = Table(
    "members",
    MetaData(),
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("clinic", String(20), nullable=False),
    Column("patient_id", String(64), nullable=False),
    Column("email", String(200)),
)


@pytest.mark.timeout(240)
async def test_offboarding_finds_a_tenants_subjects_shows_counts_and_erases_only_them(
    time_skipping_env: WorkflowEnvironment, setup: tuple[Settings, str], tmp_path: Path
) -> None:
    """Two clinics share a table; offboarding St Luke's lists its patients (nothing touched),
    waits for the DPO with the count, then erases them and only them: St Mary's patients with
    the same ids keep their rows."""
    settings, url = setup
    (tmp_path / "datamap.yaml").write_text(TWO_TENANTS)
    rows = [
        {
            "id": n,
            "clinic": "st-luke" if n % 3 else "st-mary",
            "patient_id": f"p-{n // 2}",
            "email": f"p{n}@example.org",
        }
        for n in range(400)
    ]  # fmt: skip  (patient ids repeat across the two clinics: same id, other person)
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(members.metadata.create_all)
        await conn.execute(insert(members), rows)
    await engine.dispose()
    luke = {r["patient_id"] for r in rows if r["clinic"] == "st-luke"}
    client = Client(time_skipping_env.client, settings)
    async with _running(time_skipping_env):
        bulk_id = await bulk_sdk.offboard(
            client, tenant="st-luke", requested_by="dpo", batch_size=50
        )
        waiting = await bulk_sdk.follow(client, bulk_id, settled=("awaiting_approval",), every=0.1)
        engine = create_async_engine(url)
        async with engine.connect() as conn:
            untouched = len((await conn.execute(select(members))).all())
        assert untouched == 400  # counted, nothing destroyed before approval
        assert waiting.counts.total == len(luke)
        assert waiting.discovered == {"clinic-db/0": len(luke)}
        await bulk_sdk.decide(client, bulk_id, ApprovalDecision(by="dpo"), True)
        done = await bulk_sdk.follow(client, bulk_id, every=0.1)
        await _keep_histories(time_skipping_env, bulk_id, "offboarding")

    assert done.state == "completed" and done.counts.erased == len(luke)
    async with engine.connect() as conn:
        left = [tuple(r) for r in await conn.execute(select(members.c.clinic, members.c.id))]
    await engine.dispose()
    assert sorted(left) == sorted((r["clinic"], r["id"]) for r in rows if r["clinic"] == "st-mary")
    store = await engine_for(settings.store_url.get_secret_value())
    actions = [e.action for e in await ledger.entries(store) if e.request_id == bulk_id]
    assert actions[:2] == ["bulk.requested", "bulk.discovered"]
    assert actions[-1] == "bulk.completed"
    assert actions.count("bulk.batch") == -(-len(luke) // 50)  # one root per batch of 50
