"""Erasure that does no harm, under time skipping: the preflight gate, retries that last,
whole backups only for a subject that was found, and the approver as the approval's actor.

Connectors are stand-ins registered under the real activity names (see test_erasure.py);
the control-plane activities are the real ones on a SQLite store.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio.testing import WorkflowEnvironment

from lethe.contracts import ApprovalDecision
from lethe.evidence import ledger
from lethe.evidence.store import engine_for
from lethe.kernel.config import Settings
from lethe.sdk.client import Client
from lethe.workflows.erasure import ErasureWorkflow
from tests.workflows.test_erasure import (
    Calls,
    _begin,
    _finish,
    _start,
    _status,
    _wait_for,
    _wait_state,
    calls,
    store_env,
)

__all__ = ["calls", "store_env"]  # fixtures, shared with test_erasure.py

MISSING_COLUMN = "SchemaMismatch: system 'patients-db': table 'patients' has no column 'email'"


async def test_a_failed_preflight_destroys_nothing_and_a_recheck_goes_on(
    time_skipping_env: WorkflowEnvironment, calls: Calls, store_env: str
) -> None:
    """A column the table lacks stops the request before approval, with the reason in its
    status; nothing is erased; once fixed, a `recheck` lets it go on and complete."""
    calls.unready["patients-db"] = MISSING_COLUMN
    start = _start(await time_skipping_env.get_current_time())
    handle = await _begin(time_skipping_env, start)
    status = await _wait_state(handle, "preflight_failed")
    assert [c.problems for c in status.preflight] == [[MISSING_COLUMN]] * 3  # three tables
    assert {c.step_id for c in status.preflight} == {
        "patients-db/0",
        "patients-db/1",
        "patients-db/2",
    }
    assert status.next_preflight_at is not None
    # It keeps retrying with backoff, and destroys nothing meanwhile.
    await time_skipping_env.sleep(timedelta(minutes=10))
    assert (await _status(handle)).state == "preflight_failed"
    assert calls.erased == []
    checks_before = len(calls.checked)

    del calls.unready["patients-db"]
    await handle.signal(ErasureWorkflow.recheck)
    await _wait_state(handle, "awaiting_approval")
    assert len(calls.checked) > checks_before
    assert calls.erased == []
    await handle.signal(ErasureWorkflow.approve, ApprovalDecision(by="dpo-anna"))
    certificate = await _finish(
        time_skipping_env, handle, "a_failed_preflight_destroys_nothing_and_a_recheck_goes_on"
    )
    assert certificate.outcome == "erased"

    written = await ledger.entries(await engine_for(store_env), start.request_id)
    actions = [e.action for e in written]
    assert "erasure.preflight_failed" in actions and "erasure.preflight_passed" in actions
    assert actions.index("erasure.preflight_passed") < actions.index("erasure.approved")
    # The approver, not the requester, is the actor of the approval.
    approval = next(e for e in written if e.action == "erasure.approved")
    assert approval.actor == "dpo-anna"
    assert next(e for e in written if e.action == "erasure.requested").actor == "dpo@st-mary"


async def test_a_dry_run_reports_the_preflight_and_touches_nothing(
    time_skipping_env: WorkflowEnvironment, calls: Calls
) -> None:
    calls.unready["session-cache"] = "ServiceUnavailable: Redis at 127.0.0.1:1: ConnectionError"
    start = _start(await time_skipping_env.get_current_time())
    dry = start.model_copy(update={"request": start.request.model_copy(update={"dry_run": True})})
    handle = await _begin(time_skipping_env, dry)
    certificate = await handle.result()
    assert certificate.outcome == "dry_run"
    failing = [c for c in certificate.preflight if not c.ready]
    assert [c.step_id for c in failing] == ["session-cache/0"]
    checked = {c.step_id for c in certificate.preflight}
    assert checked == {s.id for s in certificate.plan.steps if s.action != "retain"}
    assert calls.erased == []


async def test_an_outage_longer_than_eight_attempts_is_retried_until_it_ends(
    time_skipping_env: WorkflowEnvironment, calls: Calls
) -> None:
    """Eight attempts (about four minutes) used to close the request `incomplete`; now a
    step retries with capped backoff until a margin before the deadline."""
    calls.outages["session-cache"] = 12
    handle = await _begin(time_skipping_env, _start(await time_skipping_env.get_current_time()))
    await _wait_state(handle, "awaiting_approval")
    await handle.signal(ErasureWorkflow.approve, ApprovalDecision(by="dpo"))
    # While it retries, the status says why and when it tries next.
    sdk = Client(time_skipping_env.client, Settings())
    step = None
    for _ in range(100):
        status = await sdk.status(handle.id)
        step = next(s for s in status.steps if s.step_id == "session-cache/0")
        if step.last_failure:
            break
        await time_skipping_env.sleep(timedelta(seconds=5))
    assert step is not None and step.status == "running", step
    assert step.last_failure == "ServiceUnavailable: database did not answer", step
    # (The time-skipping test server leaves the next attempt's time out; the dev server and
    # the production server give it, and the status shows it.)
    assert step.attempt >= 2
    certificate = await handle.result()
    assert certificate.outcome == "erased"
    assert calls.attempts["session-cache/0"] == 13


async def test_whole_backups_are_left_alone_for_a_subject_found_nowhere(
    time_skipping_env: WorkflowEnvironment, calls: Calls
) -> None:
    """An id that matches nothing anywhere (and is not on the forget-list) must not expire
    the backups that hold everyone: the deferred steps are told the subject was not found."""
    calls.affected = 0
    handle = await _begin(
        time_skipping_env, _start(await time_skipping_env.get_current_time(), subject_id="*")
    )
    await _wait_state(handle, "awaiting_approval")
    await handle.signal(ErasureWorkflow.approve, ApprovalDecision(by="dpo"))
    certificate = await handle.result()
    deferred = {s.id for s in certificate.plan.steps if s.phase == "deferred"}
    erased = [step for step, _ in calls.erased]
    assert deferred and deferred <= set(erased)
    by_step = dict(zip(erased, calls.found, strict=True))
    assert all(by_step[step] is False for step in deferred)
    assert all(by_step[step] is True for step in set(erased) - deferred)


async def test_a_found_subject_lets_the_deferred_phase_expire_whole_backups(
    time_skipping_env: WorkflowEnvironment, calls: Calls
) -> None:
    handle = await _begin(time_skipping_env, _start(await time_skipping_env.get_current_time()))
    status = await _wait_for(handle, lambda s: s.state == "awaiting_approval")
    assert status.preflight == []
    await handle.signal(ErasureWorkflow.approve, ApprovalDecision(by="dpo"))
    await handle.result()
    assert calls.found and all(calls.found)
