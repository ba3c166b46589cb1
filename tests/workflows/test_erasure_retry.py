"""`Client.retry` under time skipping: the failed steps of a closed, incomplete request run again
under its original approval and window, with a ledger entry naming who asked; what cannot be
retried is refused clearly.

Connectors are stand-ins registered under the real activity names (see test_erasure.py); a
system in `calls.failing` fails non-retryably until the test takes it out.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest
from temporalio.client import WorkflowFailureError, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.testing import WorkflowEnvironment

from lethe.contracts import (
    ApprovalDecision,
    Certificate,
    ErasureRequest,
    ErasureStart,
    RetryOf,
)
from lethe.evidence import ledger
from lethe.evidence.store import engine_for
from lethe.kernel.config import Settings
from lethe.kernel.errors import failure_reason
from lethe.sdk.client import Client, RetryRefused, UnknownRequest
from lethe.workflows.erasure import ErasureWorkflow
from tests.workflows.test_erasure import (
    CONTROL,
    Calls,
    _begin,
    _finish,
    _start,
    _wait_state,
    calls,
    store_env,
)

__all__ = ["calls", "store_env"]  # fixtures, shared with test_erasure.py

SQL_STEPS = ["patients-db/0", "patients-db/1", "patients-db/2"]


def _sdk(env: WorkflowEnvironment) -> Client:
    return Client(env.client, Settings())


def _latest(
    env: WorkflowEnvironment, workflow_id: str
) -> WorkflowHandle[ErasureWorkflow, Certificate]:
    return env.client.get_workflow_handle_for(ErasureWorkflow.run, workflow_id)


async def _incomplete(
    env: WorkflowEnvironment, calls: Calls, system: str
) -> tuple[ErasureStart, WorkflowHandle[ErasureWorkflow, Certificate], Certificate]:
    """An approved request whose `system` fails non-retryably: closed `incomplete`."""
    calls.failing.add(system)
    start = _start(await env.get_current_time())
    handle = await _begin(env, start)
    await _wait_state(handle, "awaiting_approval")
    await handle.signal(ErasureWorkflow.approve, ApprovalDecision(by="dpo-anna", note="checked"))
    certificate = await handle.result()
    assert certificate.outcome == "incomplete"
    calls.failing.discard(system)
    calls.erased.clear()
    return start, handle, certificate


async def test_a_retry_reruns_the_failed_steps_under_the_original_approval(
    time_skipping_env: WorkflowEnvironment, calls: Calls, store_env: str
) -> None:
    start, handle, original = await _incomplete(time_skipping_env, calls, "patients-db")
    assert [o.step_id for o in original.steps if o.status == "failed"] == SQL_STEPS

    started = await _sdk(time_skipping_env).retry(handle.id, by="dpo-bob")
    assert started.workflow_id == handle.id
    assert started.retry_of == start.request_id
    assert started.steps == SQL_STEPS
    # No approval is asked for: the retry finishes without a signal.
    certificate = await asyncio.wait_for(
        _finish(
            time_skipping_env,
            _latest(time_skipping_env, handle.id),
            "a_retry_reruns_the_failed_steps_under_the_original_approval",
        ),
        timeout=60,
    )

    assert certificate.outcome == "erased"
    assert certificate.request_id == started.request_id != start.request_id
    assert certificate.plan.retry_of == start.request_id  # it names the original request
    assert [s.id for s in certificate.plan.steps] == SQL_STEPS
    assert [o.step_id for o in certificate.steps] == SQL_STEPS
    assert certificate.approval == original.approval  # the original approval stands
    assert certificate.requested_by == "dpo-bob"
    assert certificate.deadline == original.deadline
    assert certificate.received_at == original.received_at
    assert sorted(step for step, _ in calls.erased) == SQL_STEPS

    engine = await engine_for(store_env)
    report = await ledger.verify_chain(engine)
    assert report.intact, report.problems
    written = await ledger.entries(engine, started.request_id)
    assert [e.hash for e in written] == certificate.ledger_hashes
    actions = [e.action for e in written]
    assert actions[0] == "erasure.retried"
    assert "erasure.approved" not in actions and "erasure.requested" not in actions
    assert "erasure.erased" in actions
    retried = written[0]
    assert retried.actor == "dpo-bob"
    assert retried.details["retry_of"] == start.request_id
    assert retried.details["steps"] == ",".join(SQL_STEPS)
    assert retried.details["approval"] == "stands"
    assert retried.details["approved_by"] == "dpo-anna"
    assert all(start.request.subject.subject_id not in e.model_dump_json() for e in written)


async def test_a_retried_deferred_step_runs_at_once_when_the_window_has_passed(
    time_skipping_env: WorkflowEnvironment, calls: Calls
) -> None:
    _, handle, original = await _incomplete(time_skipping_env, calls, "backups")
    failed = [o.step_id for o in original.steps if o.status == "failed"]
    assert failed and all(step.startswith("backups/") for step in failed)
    asked_at = await time_skipping_env.get_current_time()

    started = await _sdk(time_skipping_env).retry(handle.id, steps=failed[:1], by="dpo-bob")
    assert started.steps == failed[:1]
    certificate = await _latest(time_skipping_env, handle.id).result()

    assert certificate.outcome == "erased"
    assert [o.step_id for o in certificate.steps] == failed[:1]
    erased_at = dict(calls.erased)
    assert erased_at[failed[0]] - asked_at < timedelta(minutes=5)  # not another 30 days
    status = await _latest(time_skipping_env, handle.id).query(ErasureWorkflow.status)
    assert original.started_at is not None and status.window_ends_at is not None
    assert status.window_ends_at <= original.started_at + timedelta(days=30)  # the original's


async def test_what_cannot_be_retried_is_refused_clearly(
    time_skipping_env: WorkflowEnvironment, calls: Calls
) -> None:
    sdk = _sdk(time_skipping_env)
    with pytest.raises(UnknownRequest, match="no erasure request"):
        await sdk.retry(f"erasure-{uuid.uuid4().hex}", by="dpo")

    # Still running (waiting for approval), then rejected.
    waiting = await _begin(time_skipping_env, _start(await time_skipping_env.get_current_time()))
    await _wait_state(waiting, "awaiting_approval")
    with pytest.raises(RetryRefused, match="is still running"):
        await sdk.retry(waiting.id, by="dpo")
    await waiting.signal(ErasureWorkflow.reject, ApprovalDecision(by="dpo-anna", note="no id"))
    await waiting.result()
    with pytest.raises(RetryRefused, match="was rejected by dpo-anna: nothing was erased"):
        await sdk.retry(waiting.id, by="dpo")

    # Completed `erased`, and a forget-list replay of it.
    start = _start(await time_skipping_env.get_current_time())
    erased = await _begin(time_skipping_env, start)
    await _wait_state(erased, "awaiting_approval")
    await erased.signal(ErasureWorkflow.approve, ApprovalDecision(by="dpo"))
    first = await erased.result()
    with pytest.raises(RetryRefused, match="completed erased: no step failed"):
        await sdk.retry(erased.id, by="dpo")
    replay = start.model_copy(
        update={
            "request_id": "req-replay-retry",
            "request": start.request.model_copy(
                update={"systems": ["patients-db"], "replay_of": first.request_id}
            ),
        }
    )
    replay_id = f"replay-{start.subject_ref}-patients-db-x"
    await time_skipping_env.client.execute_workflow(
        ErasureWorkflow.run, replay, id=replay_id, task_queue=CONTROL
    )
    with pytest.raises(RetryRefused, match="is a forget-list replay"):
        await sdk.retry(replay_id, by="dpo")

    # Incomplete: a named step must be planned, and must have failed.
    _, handle, _ = await _incomplete(time_skipping_env, calls, "patients-db")
    with pytest.raises(RetryRefused, match=r"step\(s\) nowhere/0 are not in the plan"):
        await sdk.retry(handle.id, steps=["nowhere/0"], by="dpo")
    with pytest.raises(RetryRefused, match=r"session-cache/0 \(done\) did not fail"):
        await sdk.retry(handle.id, steps=["patients-db/0", "session-cache/0"], by="dpo")
    assert calls.erased == []  # nothing was touched by any refusal


async def test_a_retry_whose_step_left_the_plan_fails_untouched_and_can_be_retried_again(
    time_skipping_env: WorkflowEnvironment, calls: Calls
) -> None:
    """The workflow plans again: a retried step the fresh plan lacks (the map changed) fails
    the retry before anything is touched; a later retry starts from the original certificate."""
    start, handle, original = await _incomplete(time_skipping_env, calls, "patients-db")
    run_id = (await handle.describe()).run_id
    assert original.started_at is not None
    gone = start.model_copy(
        update={
            "request_id": "req-gone",
            "request": ErasureRequest(
                subject=start.request.subject,
                requested_by="dpo-bob",
                retry_of=RetryOf(
                    request_id=start.request_id,
                    run_id=run_id,
                    steps=["gone-db/0", "patients-db/0"],
                    approval=original.approval,
                    started_at=original.started_at,
                    deadline=original.deadline,
                ),
            ),
        }
    )
    failed = await time_skipping_env.client.start_workflow(
        ErasureWorkflow.run,
        gone,
        id=handle.id,
        task_queue=CONTROL,
        id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
    )
    with pytest.raises(WorkflowFailureError) as raised:
        await failed.result()
    assert "cannot retry gone-db/0" in failure_reason(raised.value)
    assert "no longer has them" in failure_reason(raised.value)
    assert calls.erased == []

    started = await _sdk(time_skipping_env).retry(handle.id, by="dpo-bob")
    assert started.retry_of == start.request_id
    assert started.steps == SQL_STEPS
    certificate = await _latest(time_skipping_env, handle.id).result()
    assert certificate.outcome == "erased"
    assert certificate.plan.retry_of == start.request_id
