"""The key-rotation workflow: new KEK version, rewrap every data key, verify, raise, retire.

One rotation per deployment runs at a time: its workflow id is fixed (`key-rotation`), so a
second start joins the running one. It runs on the control queue. Long key sets continue as
new every `keys_per_run` keys, carrying the rotation's state; the rewrap activity heartbeats
the last key it finished, and a retry after a lost worker resumes there.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from lethe.keys.rotation import (
        KIND,
        RewrapCall,
        RewrapProgress,
        RotationPhase,
        RotationPlan,
        RotationProgress,
        RotationRequest,
        RotationResult,
        RotationState,
        VersionStep,
    )
    from lethe.temporal import search_attributes as sa

KEYS_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(minutes=1),
    maximum_attempts=30,
)
KEYS_TIMEOUT = timedelta(seconds=60)
REWRAP_CALL_SECONDS = 60.0
"""Work per rewrap activity call; the workflow calls again until the pass is done."""
REWRAP_TIMEOUT = timedelta(minutes=5)
REWRAP_HEARTBEAT = timedelta(seconds=20)
"""A rewrap call heartbeats after each batch; one that stops for this long is retried elsewhere."""


@workflow.defn
class KeyRotationWorkflow:
    """Rotate the key-encryption key under every data key, losing none."""

    @workflow.init
    def __init__(self, request: RotationRequest) -> None:
        # Here rather than in `run`, so that a query before the first step already answers.
        if request.state is None:
            info = workflow.info()
            self._state = RotationState(
                # The first run's id is the same for every retry and every later run; the
                # workflow id is left out (schedules and control queues make it long).
                rotation_id=f"{KIND}/{info.first_execution_run_id}",
                started_at=workflow.now(),
            )
        else:
            self._state = request.state.model_copy(update={"runs": request.state.runs + 1})

    @workflow.query
    def progress(self) -> RotationProgress:
        """Where the rotation stands."""
        state = self._state
        return RotationProgress(
            workflow_id=workflow.info().workflow_id,
            phase=state.phase,
            started_at=state.started_at,
            target=state.target,
            old_versions=state.retire,
            to_rewrap=state.to_rewrap,
            rewrapped=state.rewrapped,
            passes=state.passes,
            resumes=state.resumes,
            runs=state.runs,
            grace_ends_at=state.grace_ends_at,
        )

    @workflow.run
    async def run(self, request: RotationRequest) -> RotationResult:
        if request.state is None:
            workflow.upsert_search_attributes([sa.KIND.value_set(KIND)])
        self._set_phase(self._state.phase)

        while self._state.phase != "done":
            phase = self._state.phase
            if phase == "creating":
                await self._create(request)
            elif phase == "rewrapping":
                await self._rewrap_pass(request)  # may continue as new
            elif phase == "verifying":
                await self._verify()
            elif phase == "raising":
                await self._raise(request)
            elif phase == "grace":
                grace_ends_at = self._state.grace_ends_at
                assert grace_ends_at is not None
                await workflow.sleep(max(grace_ends_at - workflow.now(), timedelta(0)))
                self._set_phase("retiring")
            else:
                await self._retire(request)
        state = self._state
        assert state.target is not None
        return RotationResult(
            rotation_id=state.rotation_id,
            target=state.target,
            retired=state.retire,
            rewrapped=state.rewrapped,
            passes=state.passes,
            resumes=state.resumes,
            runs=state.runs,
            started_at=state.started_at,
            finished_at=workflow.now(),
        )

    async def _create(self, request: RotationRequest) -> None:
        plan = await workflow.execute_activity(
            "keys.begin_rotation",
            args=[self._state.rotation_id, request.requested_by],
            result_type=RotationPlan,
            start_to_close_timeout=KEYS_TIMEOUT,
            retry_policy=KEYS_RETRY,
        )
        self._update(
            target=plan.target,
            retire=plan.retire,
            to_rewrap=plan.to_rewrap,
            # Until then a process may still wrap a new data key under an old version.
            settled_at=workflow.now() + timedelta(seconds=plan.settle_seconds),
        )
        self._set_phase("rewrapping")

    async def _rewrap_pass(self, request: RotationRequest) -> None:
        """Rewrap from the cursor to the end of the keys below the target, continuing as new
        every `keys_per_run` keys."""
        scanned_this_run = 0
        while True:
            state = self._state
            assert state.target is not None
            done = await workflow.execute_activity(
                "keys.rewrap",
                RewrapCall(
                    target=state.target,
                    after=state.cursor,
                    batch_size=request.batch_size,
                    max_keys=request.keys_per_run - scanned_this_run,
                    max_seconds=REWRAP_CALL_SECONDS,
                ),
                result_type=RewrapProgress,
                start_to_close_timeout=REWRAP_TIMEOUT,
                heartbeat_timeout=REWRAP_HEARTBEAT,
                retry_policy=KEYS_RETRY,
            )
            scanned_this_run += done.scanned
            self._update(
                cursor=done.cursor,
                rewrapped=state.rewrapped + done.rewrapped,
                resumes=state.resumes + int(done.resumed),
            )
            if done.done:
                self._update(cursor=None)
                self._set_phase("verifying")
                return
            if scanned_this_run >= request.keys_per_run or (
                workflow.info().is_continue_as_new_suggested()
            ):
                workflow.continue_as_new(request.model_copy(update={"state": self._state}))

    async def _verify(self) -> None:
        """Once every process sees the new version, count the keys left below it; rewrap
        again from the start if there are any (written under the old version meanwhile)."""
        state = self._state
        assert state.target is not None and state.settled_at is not None
        await workflow.sleep(max(state.settled_at - workflow.now(), timedelta(0)))
        left = await workflow.execute_activity(
            "keys.count_below",
            state.target,
            result_type=int,
            start_to_close_timeout=KEYS_TIMEOUT,
            retry_policy=KEYS_RETRY,
        )
        if left:
            self._update(passes=state.passes + 1, cursor=None)
            self._set_phase("rewrapping")
        else:
            self._set_phase("raising")

    async def _raise(self, request: RotationRequest) -> None:
        state = self._state
        assert state.target is not None
        left = await workflow.execute_activity(
            "keys.raise_min_version",
            self._step(request),
            result_type=int,
            start_to_close_timeout=KEYS_TIMEOUT,
            retry_policy=KEYS_RETRY,
        )
        if left:  # written under an old version after the count: rewrap those first
            self._update(passes=state.passes + 1, cursor=None)
            self._set_phase("rewrapping")
        else:
            self._update(grace_ends_at=workflow.now() + request.grace)
            self._set_phase("grace")

    async def _retire(self, request: RotationRequest) -> None:
        await workflow.execute_activity(
            "keys.retire",
            self._step(request),
            result_type=list[int],
            start_to_close_timeout=KEYS_TIMEOUT,
            retry_policy=KEYS_RETRY,
        )
        self._set_phase("done")

    def _step(self, request: RotationRequest) -> VersionStep:
        state = self._state
        assert state.target is not None
        return VersionStep(
            rotation_id=state.rotation_id,
            target=state.target,
            versions=state.retire,
            requested_by=request.requested_by,
        )

    def _update(self, **changes: object) -> None:
        self._state = self._state.model_copy(update=changes)

    def _set_phase(self, phase: RotationPhase) -> None:
        """Move to `phase`, in the progress query and in the LetheStatus search attribute."""
        self._update(phase=phase)
        workflow.upsert_search_attributes([sa.STATUS.value_set(phase)])
