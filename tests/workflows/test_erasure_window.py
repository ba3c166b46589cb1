"""The erasure window under time skipping: it ends at the Art. 12(3) deadline when that comes
first (a request of 1 February, a 30-day window, a deadline of 1 March), unless the plan says
the window may end after it.

This module runs on a time-skipping server of its own: it moves the clock to February, which
the shared server's other tests need not live through. Connectors are stand-ins registered
under the real activity names (see test_erasure.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from lethe.codec import converter as codec
from lethe.contracts import ApprovalDecision
from lethe.evidence import ledger
from lethe.evidence.store import engine_for
from lethe.policies.model import PACKS_DIR
from lethe.temporal.embedded import start_time_skipping
from lethe.workflows.erasure import ErasureWorkflow
from tests.workflows.test_erasure import (
    Calls,
    _begin,
    _finish,
    _start,
    _status,
    _wait_state,
    calls,
    store_env,
)

__all__ = ["calls", "store_env"]  # fixtures, shared with test_erasure.py


@pytest.fixture(scope="module")
async def time_skipping_env(
    test_codec: codec.EncryptionCodec,
) -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping server for this module alone (its clock goes to February)."""
    env = await start_time_skipping(codec.data_converter(test_codec))
    yield env
    await env.shutdown()


async def _skip_to_1_february(env: WorkflowEnvironment) -> datetime:
    """Move the server's clock to the next 1 February, 09:00 UTC; the time it shows then."""
    now = await env.get_current_time()
    target = datetime(now.year, 2, 1, 9, 0, tzinfo=UTC)
    if target <= now:
        target = target.replace(year=now.year + 1)
    await env.sleep(target - now)
    arrived = await env.get_current_time()
    assert target <= arrived < target + timedelta(minutes=5), arrived
    return arrived


async def test_a_request_of_1_february_with_a_30_day_window_runs_its_deferred_steps_by_1_march(
    time_skipping_env: WorkflowEnvironment, calls: Calls, store_env: str
) -> None:
    received = await _skip_to_1_february(time_skipping_env)
    start = _start(received)
    handle = await _begin(time_skipping_env, start)
    await _wait_state(handle, "awaiting_approval")
    await handle.signal(ErasureWorkflow.approve, ApprovalDecision(by="dpo"))
    certificate = await _finish(
        time_skipping_env,
        handle,
        "a_request_of_1_february_with_a_30_day_window_runs_its_deferred_steps_by_1_march",
    )

    march = received.replace(month=3, day=1)
    assert certificate.deadline == march  # one month from 1 February: 28 days, not 30
    assert certificate.plan.window == timedelta(days=30)
    assert certificate.plan.window_ends_after_deadline is False
    assert "ends at the deadline when that comes first" in certificate.plan.window_note
    assert certificate.outcome == "erased"
    deferred = [s.id for s in certificate.plan.steps if s.phase == "deferred"]
    erased_at = dict(calls.erased)
    assert deferred
    for step_id in deferred:
        # At the end of the window, which is the deadline (minus nothing): on 1 March, the
        # moment the window ends (plus the preflight's round trip), not on 3 March.
        assert erased_at[step_id].date() == march.date(), step_id
        assert march <= erased_at[step_id] < march + timedelta(minutes=1), step_id
    assert (await _status(handle)).window_ends_at == march

    written = await ledger.entries(await engine_for(store_env), start.request_id)
    started = next(e for e in written if e.action == "erasure.started")
    assert started.details["window"] == "30d"
    assert started.details["window_days"] == 30
    assert started.details["window_ends_at"] == march.isoformat()
    assert started.details["window_cut_to_deadline"] is True
    assert started.details["window_ends_after_deadline"] is False


async def test_a_window_the_plan_lets_end_after_the_deadline_does_and_says_so(
    time_skipping_env: WorkflowEnvironment,
    calls: Calls,
    store_env: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gdpr = (PACKS_DIR / "gdpr.yaml").read_text()
    line = next(line for line in gdpr.splitlines(keepends=True) if line.startswith("  window:"))
    pack = tmp_path / "pack.yaml"
    pack.write_text(
        gdpr.replace(
            line, "  window: 40d\n  window_may_end_after_deadline: backups rotate every 40 days\n"
        )
    )
    monkeypatch.setenv("LETHE_POLICY", str(pack))
    start = _start(await time_skipping_env.get_current_time())
    handle = await _begin(time_skipping_env, start)
    await _wait_state(handle, "awaiting_approval")
    await handle.signal(ErasureWorkflow.approve, ApprovalDecision(by="dpo"))
    certificate = await _finish(
        time_skipping_env, handle, "a_window_the_plan_lets_end_after_the_deadline_does_and_says_so"
    )

    assert certificate.plan.window_ends_after_deadline is True
    assert "backups rotate every 40 days" in certificate.plan.window_note
    assert certificate.started_at is not None
    window_ends = certificate.started_at + timedelta(days=40)
    assert window_ends > certificate.deadline
    assert (await _status(handle)).window_ends_at == window_ends
    erased_at = dict(calls.erased)
    for step in certificate.plan.steps:
        if step.phase == "deferred":
            assert erased_at[step.id] >= window_ends, step.id

    written = await ledger.entries(await engine_for(store_env), start.request_id)
    started = next(e for e in written if e.action == "erasure.started")
    assert started.details["window_ends_after_deadline"] is True
    assert started.details["window_cut_to_deadline"] is False
