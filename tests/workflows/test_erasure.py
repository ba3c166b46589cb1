"""The erasure workflow under time skipping: approval, the 30-day window, holds, deadlines, joins.

Connectors are replaced by registering other functions under their activity names (the
workflow's behaviour is under test here; each connector has its own integration tests). The
control-plane activities are the real ones, on a SQLite store in a temporary folder.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import activity
from temporalio.client import WorkflowHandle, WorkflowHistory
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from lethe import worker as lethe_worker
from lethe.contracts import (
    ApprovalDecision,
    Certificate,
    ErasureRequest,
    ErasureStart,
    ErasureStatus,
    Extension,
    Hold,
    StepCheck,
    StepOutcome,
    StepRequest,
    Subject,
    VerifyRequest,
)
from lethe.evidence import forget_list, holds, ledger
from lethe.evidence.store import engine_for
from lethe.kernel.database import dispose_all
from lethe.kernel.regions import task_queue
from lethe.policies.model import PACKS_DIR
from lethe.workflows.erasure import (
    STEPS_FROM_PARENT,
    ErasureWorkflow,
)
from lethe.workflows.regional_erasure import RegionalErasureWorkflow

ROOT = Path(__file__).resolve().parents[2]
CONTROL = "lethe-control"
TEST_SUBJECT_KEY = base64.b64encode(b"subject-key-for-tests-only-32byt").decode()
KINDS = ("sql", "kafka", "redis", "blob", "logs", "keys")


@dataclass
class Calls:
    """What the stand-in connectors were asked to do, and when (in workflow time)."""

    erased: list[tuple[str, datetime]] = field(default_factory=list)
    verified: list[str] = field(default_factory=list)
    failing: set[str] = field(default_factory=set)
    checked: list[str] = field(default_factory=list)
    unready: dict[str, str] = field(default_factory=dict)
    """System -> the problem its preflight reports."""
    found: list[bool] = field(default_factory=list)
    """Each erase call's `subject_found`."""
    affected: int = 1
    """What each stand-in erase reports it touched."""
    outages: dict[str, int] = field(default_factory=dict)
    """System -> how many attempts of its steps fail as unreachable before one succeeds."""
    attempts: dict[str, int] = field(default_factory=dict)
    """Step -> the attempt that finally erased it."""
    evidence: dict[str, dict[str, str | int]] = field(default_factory=dict)
    """System -> the evidence its stand-in erase reports."""

    def check(self, request: StepRequest) -> StepCheck:
        """A stand-in preflight: the problem `unready` names for the step's system, if any."""
        self.checked.append(request.step.id)
        problem = self.unready.get(request.step.system)
        return StepCheck(step_id=request.step.id, problems=[problem] if problem else [])


def connectors(calls: Calls) -> list[Callable[..., Any]]:
    """Stand-ins registered under the real connectors' activity names."""
    made: list[Callable[..., Any]] = []
    for kind in KINDS:

        @activity.defn(name=f"{kind}.erase")
        async def erase(request: StepRequest) -> StepOutcome:
            if request.step.system in calls.failing:
                raise ApplicationError(
                    "table patients has no column email",
                    type="SchemaMismatch",
                    non_retryable=True,
                )
            attempt = activity.info().attempt
            if attempt <= calls.outages.get(request.step.system, 0):
                raise ApplicationError("database did not answer", type="ServiceUnavailable")
            calls.attempts[request.step.id] = attempt
            calls.erased.append((request.step.id, activity.info().current_attempt_scheduled_time))
            calls.found.append(request.subject_found)
            # The real activities erase, then verify, in one call.
            return StepOutcome(
                step_id=request.step.id,
                status="done",
                affected=calls.affected,
                verified=True,
                evidence=calls.evidence.get(request.step.system, {}),
            )

        @activity.defn(name=f"{kind}.verify")
        async def verify(check: VerifyRequest) -> StepOutcome:
            calls.verified.append(check.request.step.id)
            return check.erased.model_copy(update={"status": "done", "verified": True})

        @activity.defn(name=f"{kind}.preflight")
        async def preflight(request: StepRequest) -> StepCheck:
            return calls.check(request)

        made += [erase, verify, preflight]

    @activity.defn(name="region.preflight")
    async def region_preflight(requests: list[StepRequest]) -> list[StepCheck]:
        return [calls.check(request) for request in requests]

    return [*made, region_preflight]


@pytest.fixture(scope="module")
def store_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Point the control activities at a temporary SQLite store and the sample map (GDPR)."""
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('store') / 'lethe.db'}"
    names = ("LETHE_STORE_URL", "LETHE_DATAMAP", "LETHE_POLICY", "LETHE_SUBJECT_KEY")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(
        LETHE_SUBJECT_KEY=TEST_SUBJECT_KEY,
        LETHE_STORE_URL=url,
        LETHE_DATAMAP=str(ROOT / "examples" / "datamap.yaml"),
        LETHE_POLICY=str(PACKS_DIR / "gdpr.yaml"),
    )
    yield url
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
async def calls(time_skipping_env: WorkflowEnvironment, store_env: str) -> AsyncIterator[Calls]:
    """Run a control worker and an `eu` worker with stand-in connectors for one test."""
    recorded = Calls()
    control, region = workers(time_skipping_env, recorded)
    async with control, region:
        yield recorded
    await dispose_all()


def workers(env: WorkflowEnvironment, calls: Calls) -> tuple[Worker, Worker]:
    """The real control worker, and an `eu` worker with stand-in connectors that record."""
    control = Worker(
        env.client,
        task_queue=CONTROL,
        workflows=list(lethe_worker.CONTROL_WORKFLOWS),
        activities=list(lethe_worker.CONTROL_ACTIVITIES),
    )
    region = Worker(
        env.client,
        task_queue=task_queue("eu"),
        workflows=[RegionalErasureWorkflow],
        activities=connectors(calls),
    )
    return control, region


def _start(received_at: datetime, subject_id: str | None = None) -> ErasureStart:
    subject = Subject(
        tenant="st-mary",
        subject_id=subject_id or f"p-{uuid.uuid4().hex[:8]}",
        identities={"email": "a@b.org"},
    )
    return ErasureStart(
        request_id=f"req-{uuid.uuid4().hex[:12]}",
        subject_ref=uuid.uuid4().hex,
        request=ErasureRequest(
            subject=subject, requested_by="dpo@st-mary", reason="Art. 17 request"
        ),
        received_at=received_at,
    )


async def _begin(
    env: WorkflowEnvironment, start: ErasureStart
) -> WorkflowHandle[ErasureWorkflow, Certificate]:
    return await env.client.start_workflow(
        ErasureWorkflow.run,
        start,
        id=f"erasure-{start.subject_ref}",
        task_queue=CONTROL,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
    )


HISTORIES = Path(__file__).parent / "histories" / "steps-from-parent"
"""Where LETHE_RECORD_HISTORIES=1 records: one folder per shape of the workflows. A versioned
change records into a new folder and keeps the old ones, whose runs must still replay."""


def save_history(path: Path, workflow_id: str, history: WorkflowHistory) -> None:
    """Write a history as the replay tests read it (with its workflow id)."""
    recorded = {"workflowId": workflow_id, **json.loads(history.to_json())}
    path.write_text(json.dumps(recorded, indent=1))


def markers(history: WorkflowHistory) -> list[tuple[str, str]]:
    """Each marker of the history in order: (`core_patch`, patch id) or (name, "")."""
    found = []
    for event in history.events:
        if not event.HasField("marker_recorded_event_attributes"):
            continue
        marker = event.marker_recorded_event_attributes
        patch = ""
        if marker.marker_name == "core_patch":
            patch = json.loads(marker.details["patch-data"].payloads[0].data)["id"]
        found.append((marker.marker_name, patch))
    return found


def assert_patches_decided_first(history: WorkflowHistory) -> None:
    """The run decided its patches before any local activity (see PATCHES_FIRST)."""
    found = markers(history)
    first = [("core_patch", STEPS_FROM_PARENT)]  # it implies the patches before it
    assert found[:1] == first, found[:2]
    assert [m for m in found if m[0] == "core_patch"] == first, found


async def _finish(
    env: WorkflowEnvironment, handle: WorkflowHandle[ErasureWorkflow, Certificate], name: str
) -> Certificate:
    """The certificate, after checking how the run decided its patches; with
    LETHE_RECORD_HISTORIES=1, also save the histories for replay tests."""
    certificate = await handle.result()
    history = await handle.fetch_history()
    assert_patches_decided_first(history)
    if os.environ.get("LETHE_RECORD_HISTORIES") == "1":
        HISTORIES.mkdir(parents=True, exist_ok=True)
        save_history(HISTORIES / f"{name}.json", handle.id, history)
        children = [
            e.child_workflow_execution_started_event_attributes.workflow_execution.workflow_id
            for e in history.events
            if e.HasField("child_workflow_execution_started_event_attributes")
        ]
        for index, child in enumerate(children):
            child_history = await env.client.get_workflow_handle(child).fetch_history()
            save_history(HISTORIES / f"{name}.child{index}.json", child, child_history)
    return certificate


async def _status(handle: WorkflowHandle[ErasureWorkflow, Certificate]) -> ErasureStatus:
    return await handle.query(ErasureWorkflow.status, rpc_timeout=timedelta(seconds=10))


async def _wait_for(
    handle: WorkflowHandle[ErasureWorkflow, Certificate], check: Callable[[ErasureStatus], bool]
) -> ErasureStatus:
    status = None
    for _ in range(100):
        status = await _status(handle)  # answers from the first moment (workflow.init)
        if check(status):
            return status
        await asyncio.sleep(0.1)
    raise AssertionError(f"the status never got there; last: {status}")


async def _wait_state(
    handle: WorkflowHandle[ErasureWorkflow, Certificate], state: str
) -> ErasureStatus:
    return await _wait_for(handle, lambda status: status.state == state)


async def test_approved_erasure_runs_immediate_steps_then_waits_the_window(
    time_skipping_env: WorkflowEnvironment, calls: Calls, store_env: str
) -> None:
    start = _start(await time_skipping_env.get_current_time())
    handle = await _begin(time_skipping_env, start)
    status = await _wait_state(handle, "awaiting_approval")
    assert status.approval_required
    assert not calls.erased  # nothing is destroyed before approval
    await handle.signal(ErasureWorkflow.approve, ApprovalDecision(by="dpo@st-mary"))

    certificate = await _finish(
        time_skipping_env, handle, "approved_erasure_runs_immediate_steps_then_waits_the_window"
    )

    assert certificate.outcome == "erased"
    assert certificate.approval is not None and certificate.approval.by == "dpo@st-mary"
    assert {o.step_id for o in certificate.steps} == {s.id for s in certificate.plan.steps}
    erased_at = dict(calls.erased)
    assert certificate.started_at is not None
    immediate = [
        s.id for s in certificate.plan.steps if s.phase == "immediate" and s.action != "retain"
    ]
    deferred = [s.id for s in certificate.plan.steps if s.phase == "deferred"]
    assert immediate and deferred
    for step_id in immediate:
        assert erased_at[step_id] - certificate.started_at < timedelta(days=1)
    for step_id in deferred:
        # The window is 30 days, cut to the Art. 12(3) deadline when that comes first.
        window = min(timedelta(days=30), certificate.deadline - certificate.started_at)
        assert erased_at[step_id] - certificate.started_at >= window
    assert all(o.verified for o in certificate.steps if o.status == "done")

    engine = await engine_for(store_env)
    report = await ledger.verify_chain(engine)
    assert report.intact, report.problems
    written = await ledger.entries(engine, start.request_id)
    assert [e.hash for e in written] == certificate.ledger_hashes
    assert {e.tenant for e in written} == {start.request.subject.tenant}
    assert {"erasure.requested", "erasure.approved", "erasure.started", "erasure.erased"} <= {
        e.action for e in written
    }
    assert all(start.request.subject.subject_id not in e.model_dump_json() for e in written)


async def test_rejected_request_destroys_nothing(
    time_skipping_env: WorkflowEnvironment, calls: Calls
) -> None:
    handle = await _begin(time_skipping_env, _start(await time_skipping_env.get_current_time()))
    await _wait_state(handle, "awaiting_approval")
    await handle.signal(
        ErasureWorkflow.reject, ApprovalDecision(by="dpo", note="identity not verified")
    )
    certificate = await _finish(time_skipping_env, handle, "rejected_request_destroys_nothing")
    assert certificate.outcome == "rejected"
    assert calls.erased == []


async def test_deadline_is_flagged_then_extended_with_a_reason(
    time_skipping_env: WorkflowEnvironment, calls: Calls, store_env: str
) -> None:
    start = _start(await time_skipping_env.get_current_time())
    handle = await _begin(time_skipping_env, start)
    first = await _wait_state(handle, "awaiting_approval")
    await time_skipping_env.sleep(timedelta(days=32))
    await _wait_for(handle, lambda status: status.overdue)
    await handle.signal(
        ErasureWorkflow.extend,
        Extension(months=2, reason="complex request across 5 systems", by="dpo"),
    )
    extended = await _wait_for(handle, lambda status: status.extension is not None)
    assert not extended.overdue
    assert extended.extension is not None and extended.extension.reason.startswith("complex")
    assert (extended.deadline - first.deadline).days >= 59
    await handle.signal(ErasureWorkflow.approve, ApprovalDecision(by="dpo"))
    certificate = await _finish(
        time_skipping_env, handle, "deadline_is_flagged_then_extended_with_a_reason"
    )
    assert certificate.extension is not None
    assert certificate.deadline == extended.deadline
    written = await ledger.entries(await engine_for(store_env), start.request_id)
    actions = [entry.action for entry in written]
    assert actions.count("erasure.deadline_missed") == 1
    assert actions.count("erasure.extended") == 1
    assert all("complex request" not in entry.model_dump_json() for entry in written)


async def _approved_under_a_subject_hold(
    env: WorkflowEnvironment, store_env: str
) -> tuple[AsyncEngine, Hold, WorkflowHandle[ErasureWorkflow, Certificate]]:
    """An erasure approved while a litigation hold covers its subject."""
    start = _start(await env.get_current_time())
    engine = await engine_for(store_env)
    hold = await holds.place(
        engine,
        matter="Doe v. St Mary",
        scope="subject",
        value=start.subject_ref,
        placed_by="counsel",
        reason="litigation",
    )
    handle = await _begin(env, start)
    await _wait_state(handle, "awaiting_approval")
    await handle.signal(ErasureWorkflow.approve, ApprovalDecision(by="dpo"))
    return engine, hold, handle


async def test_a_subject_hold_blocks_until_released(
    time_skipping_env: WorkflowEnvironment, calls: Calls, store_env: str
) -> None:
    engine, hold, handle = await _approved_under_a_subject_hold(time_skipping_env, store_env)
    status = await _wait_state(handle, "on_hold")
    immediate = [s for s in status.steps if s.phase == "immediate" and s.action != "retain"]
    assert {s.status for s in immediate} == {"held"}
    assert all(hold.id in s.holds for s in status.steps if s.status == "held")
    assert calls.erased == []

    await holds.release(engine, hold.id, released_by="counsel")
    await handle.signal(ErasureWorkflow.holds_changed)
    certificate = await _finish(time_skipping_env, handle, "a_subject_hold_blocks_until_released")
    assert certificate.outcome == "erased"
    assert calls.erased


async def test_a_category_hold_blocks_only_the_steps_it_covers(
    time_skipping_env: WorkflowEnvironment, calls: Calls, store_env: str
) -> None:
    engine = await engine_for(store_env)
    hold = await holds.place(
        engine,
        matter="audit",
        scope="system",
        value="session-cache",
        placed_by="counsel",
        reason="audit",
    )
    try:
        handle = await _begin(time_skipping_env, _start(await time_skipping_env.get_current_time()))
        await _wait_state(handle, "awaiting_approval")
        await handle.signal(ErasureWorkflow.approve, ApprovalDecision(by="dpo"))
        status = await _wait_state(handle, "on_hold")
        held = {s.step_id for s in status.steps if s.status == "held"}
        assert held == {"session-cache/0"}
        assert "patients-db/0" in {step_id for step_id, _ in calls.erased}
    finally:
        await holds.release(engine, hold.id, released_by="counsel")
    # Without a signal, the hourly re-check finds the release (time skipping runs the timer).
    certificate = await _finish(
        time_skipping_env, handle, "a_category_hold_blocks_only_the_steps_it_covers"
    )
    assert certificate.outcome == "erased"


async def test_one_failing_system_does_not_stop_the_others(
    time_skipping_env: WorkflowEnvironment, calls: Calls
) -> None:
    calls.failing.add("patients-db")
    handle = await _begin(time_skipping_env, _start(await time_skipping_env.get_current_time()))
    await _wait_state(handle, "awaiting_approval")
    await handle.signal(ErasureWorkflow.approve, ApprovalDecision(by="dpo"))
    certificate = await _finish(
        time_skipping_env, handle, "one_failing_system_does_not_stop_the_others"
    )
    assert certificate.outcome == "incomplete"
    failed = [o for o in certificate.steps if o.status == "failed"]
    assert failed and all(o.step_id.startswith("patients-db/") for o in failed)
    assert "SchemaMismatch" in failed[0].detail
    assert any(o.status == "done" for o in certificate.steps)


async def test_a_second_request_for_the_same_subject_joins_the_first(
    time_skipping_env: WorkflowEnvironment, calls: Calls
) -> None:
    start = _start(await time_skipping_env.get_current_time())
    first = await _begin(time_skipping_env, start)
    again = await _begin(time_skipping_env, start.model_copy(update={"request_id": "req-other"}))
    assert again.result_run_id == first.result_run_id
    await _wait_state(first, "awaiting_approval")
    await first.signal(ErasureWorkflow.reject, ApprovalDecision(by="dpo"))
    assert (await again.result()).request_id == start.request_id


async def test_dry_run_plans_and_touches_nothing(
    time_skipping_env: WorkflowEnvironment, calls: Calls
) -> None:
    start = _start(await time_skipping_env.get_current_time())
    dry = start.model_copy(update={"request": start.request.model_copy(update={"dry_run": True})})
    certificate = await time_skipping_env.client.execute_workflow(
        ErasureWorkflow.run, dry, id=f"erasure-dryrun-{uuid.uuid4().hex}", task_queue=CONTROL
    )
    assert certificate.outcome == "dry_run"
    assert certificate.plan.steps
    assert calls.erased == []


async def test_the_subject_goes_on_the_forget_list_and_a_replay_reapplies_one_system(
    time_skipping_env: WorkflowEnvironment, calls: Calls, store_env: str
) -> None:
    start = _start(await time_skipping_env.get_current_time())
    handle = await _begin(time_skipping_env, start)
    await _wait_state(handle, "awaiting_approval")
    await handle.signal(ErasureWorkflow.approve, ApprovalDecision(by="dpo"))
    first = await handle.result()

    engine = await engine_for(store_env)
    listed = dict(await forget_list.subjects(engine, base64.b64decode(TEST_SUBJECT_KEY)))
    assert listed[start.subject_ref] == start.request.subject

    calls.erased.clear()
    replay = start.model_copy(
        update={
            "request_id": "req-replay",
            "request": start.request.model_copy(
                update={"systems": ["patients-db"], "replay_of": first.request_id}
            ),
        }
    )
    certificate = await time_skipping_env.client.execute_workflow(
        ErasureWorkflow.run,
        replay,
        id=f"replay-{start.subject_ref}-patients-db",
        task_queue=CONTROL,
    )
    assert certificate.outcome == "erased"
    assert certificate.approval is None  # the original erasure was approved; no new approval
    assert {step.system for step in certificate.plan.steps} == {"patients-db"}
    assert {step_id for step_id, _ in calls.erased} == {
        s.id for s in certificate.plan.steps if s.action != "retain"
    }


async def test_the_status_answers_from_the_first_moment(
    time_skipping_env: WorkflowEnvironment, calls: Calls
) -> None:
    for _ in range(5):
        start = _start(await time_skipping_env.get_current_time())
        handle = await _begin(time_skipping_env, start)
        status = await _status(handle)  # no retry: the state is set up in workflow.init
        assert status.request_id == start.request_id
        assert status.state in ("planning", "awaiting_approval")
        await handle.signal(ErasureWorkflow.reject, ApprovalDecision(by="dpo"))
        assert (await handle.result()).outcome == "rejected"


async def test_a_hold_of_two_years_keeps_the_history_small_and_the_erasure_finishes(
    time_skipping_env: WorkflowEnvironment, calls: Calls, store_env: str
) -> None:
    engine, hold, handle = await _approved_under_a_subject_hold(time_skipping_env, store_env)
    await _wait_state(handle, "on_hold")

    await time_skipping_env.sleep(timedelta(days=730))
    held = await _wait_state(handle, "on_hold")
    assert calls.erased == []
    await holds.release(engine, hold.id, released_by="counsel")
    await handle.signal(ErasureWorkflow.holds_changed)
    certificate = await handle.result()

    assert certificate.outcome == "erased", held
    events = len((await handle.fetch_history()).events)
    # Re-checked after 1 h, 2 h, ... then daily: about 740 checks of a few events each.
    assert events < 10_000, events
