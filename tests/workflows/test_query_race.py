"""A status query that races an erasure's first workflow task answers, and leaves a history that
replays.

`lethe erase` asks for the status from the moment it submits. On the dev server, a query that
arrives while the planning local activity finishes makes the task complete early, and the
activity's result reaches the workflow in the next task; a patch decided after that result
then replayed as absent (the demo's nondeterminism error). The workflow now decides its patches
before any local activity (PATCHES_FIRST); this test races queries against many submissions and
replays every history.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from lethe.codec import converter as codec
from lethe.contracts import ApprovalDecision, Certificate, ErasureStatus
from lethe.kernel.database import dispose_all
from lethe.workflows.erasure import ErasureWorkflow
from lethe.workflows.regional_erasure import RegionalErasureWorkflow

from .test_erasure import (
    Calls,
    _begin,
    _start,
    assert_patches_decided_first,
    store_env,
    workers,
)

__all__ = ["store_env"]  # a fixture, shared with test_erasure.py

SUBMISSIONS = 12
QUERIERS = 4


async def _race(
    handle: WorkflowHandle[ErasureWorkflow, Certificate], request_id: str
) -> ErasureStatus:
    """Query from the first moment, several at once, until planning is over."""

    async def ask() -> ErasureStatus:
        # It answers from the first moment: the state is set up before the first task runs.
        return await handle.query(ErasureWorkflow.status, rpc_timeout=timedelta(seconds=10))

    while True:
        answers = await asyncio.gather(*(ask() for _ in range(QUERIERS)))
        for status in answers:
            assert status.request_id == request_id
            if status.state != "planning":
                return status


async def test_queries_racing_the_first_task_leave_histories_that_replay(
    local_env: WorkflowEnvironment, store_env: str, test_codec: codec.EncryptionCodec
) -> None:
    control, region = workers(local_env, Calls())
    replayer = Replayer(
        workflows=[ErasureWorkflow, RegionalErasureWorkflow],
        data_converter=codec.data_converter(test_codec),
    )
    async with control, region:
        for _ in range(SUBMISSIONS):
            start = _start(await local_env.get_current_time())
            handle = await _begin(local_env, start)
            status = await _race(handle, start.request_id)
            assert status.state == "awaiting_approval", status
            await handle.signal(ErasureWorkflow.reject, ApprovalDecision(by="dpo"))
            certificate = await handle.result()
            assert certificate.outcome == "rejected"
            history = await handle.fetch_history()
            assert_patches_decided_first(history)
            replayed = await replayer.replay_workflow(history, raise_on_replay_failure=False)
            assert replayed.replay_failure is None, replayed.replay_failure
    await dispose_all()
