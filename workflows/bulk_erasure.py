"""A bulk erasure: many subjects of one tenant, batch after batch, on the control queue.

The subjects are staged in Lethe's store (sealed) before the workflow starts; its input and
history hold only the request, a cursor and counts, and each batch's subjects travel once, in
that batch's activity inputs (encrypted by the codec). The plan is made once for the tenant.

Phases: `discover` (an offboarding lists the tenant's subjects), `immediate` (SQL, Kafka, Redis,
keys steps), then, once the erasure window has ended, `deferred` (blob and log steps) over the
subjects the first phase took, `recheck` (steps left `pending_compaction` verified again), then
`held`: subjects set aside for a legal hold, taken again (every step) when holds change or after
a backoff. Each batch:
local activity `bulk.next_batch` (sets aside subjects erased before, subjects a single request is
erasing, subjects under a hold), one `<kind>.erase_batch` activity per step on the step's region
queue (no child workflow: residency is the queue and the worker's region check), then local
activity `bulk.record_batch` (one ledger entry with the Merkle root over the batch's leaves).
The DPO can pause, resume and cancel (cancel stops new batches; what ran stays recorded).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from lethe.contracts import (
        ApprovalDecision,
        BatchStepOutcome,
        BatchStepRequest,
        BulkBatch,
        BulkBatchQuery,
        BulkBatchRecord,
        BulkCounts,
        BulkFound,
        BulkPhase,
        BulkProgress,
        BulkRecheck,
        BulkRecheckRecord,
        BulkRecorded,
        BulkRequest,
        BulkState,
        BulkStepTotals,
        BulkSubject,
        LedgerRecord,
        Plan,
        Step,
        StepRequest,
        SubjectOutcome,
        SubjectsPage,
        SubjectsQuery,
        VerifyBatch,
    )
    from lethe.kernel.deadlines import add_months, window_end
    from lethe.kernel.errors import failure_reason
    from lethe.kernel.regions import task_queue
    from lethe.temporal import search_attributes as sa
    from lethe.workflows.erasure import (
        CONTROL_RETRY,
        CONTROL_TIMEOUT,
        PREFLIGHT_RETRY,
        RETRY_MARGIN,
        preflight,
    )
    from lethe.workflows.regional_erasure import (
        CONNECTOR_HEARTBEAT,
        CONNECTOR_RETRY,
        CONNECTOR_TIMEOUT,
        MIN_RETRY_SPAN,
    )

Details = dict[str, str | int | float | bool | None]
KIND = "erasure-bulk"
"""The `LetheKind` of a bulk request."""
LISTS_SUBJECTS = ("sql", "redis")
"""Kinds of system whose connectors list a tenant's subjects (`<kind>.subjects`: the kinds
`activities.connectors.SUBJECT_LISTS` registers)."""
DISCOVERY_SPAN = timedelta(hours=1)
"""How long one page of an offboarding's discovery may retry an unreachable system."""
BATCHES_OVERLAP = "batches-overlap"
"""Patch: while a batch erases, the next one is taken (`bulk.next_batch`) and the one before is
recorded (`bulk.record_batch`): the control plane's work between batches no longer adds to each
batch's time. Those local activities start once the first of the batch's activities has ended,
in the workflow task that its end starts: a task with local activities running holds its
commands until they finish, so the task that schedules the batch's activities must end without
any (a 1 ms timer would do it too, but the server fires timers up to a second late). Runs before
it took, erased and recorded one batch at a time
(`tests/workflows/histories/bulk-one-batch-at-a-time`)."""
HELD_RECHECK = (timedelta(hours=1), timedelta(days=1))
"""Subjects or steps under a hold are looked at again after the first, doubling to the second,
or at once on `holds_changed`."""


@workflow.defn
class BulkErasureWorkflow:
    """Erase many subjects of one tenant in batches, with one Merkle root per batch."""

    @workflow.init
    def __init__(self, request: BulkRequest) -> None:
        self._p = request.progress or BulkProgress(
            bulk_id=request.bulk_id,
            tenant=request.tenant,
            received_at=request.received_at,
            counts=BulkCounts(total=request.total),
            phase="discover" if request.source == "offboard" else "immediate",
        )
        self._rejection: ApprovalDecision | None = None
        self._recheck = False
        self._holds_changed = False
        self._run_batches = 0
        self._actions = 0
        self._hold_delay = HELD_RECHECK[0]
        self._overlap = False
        self._hold_signals = 0
        self._records = 0
        self._steps_ended = 0

    # --- signals and the query ------------------------------------------------------------

    @workflow.signal
    def approve(self, decision: ApprovalDecision) -> None:
        """The DPO approves the plan for every subject of the request."""
        if self._rejection is None and self._p.approval is None:
            self._p.approval = decision

    @workflow.signal
    def reject(self, decision: ApprovalDecision) -> None:
        """The DPO rejects the request (before anything is erased)."""
        if self._p.approval is None:
            self._rejection = decision

    @workflow.signal
    def pause(self, by: str) -> None:
        """Stop taking new batches (the batch running finishes) until `resume`."""
        if self._p.cancelled_by is None:
            self._p.paused_by = by

    @workflow.signal
    def resume(self, by: str) -> None:
        """Take batches again after a pause."""
        self._p.paused_by = None

    @workflow.signal
    def cancel(self, by: str) -> None:
        """Take no new batch; what ran stays recorded and certified."""
        self._p.cancelled_by = by

    @workflow.signal
    def recheck(self) -> None:
        """The DPO fixed what the preflight found: check again now."""
        self._recheck = True

    @workflow.signal
    def holds_changed(self) -> None:
        """A hold was released (or placed): look at held subjects and steps again now."""
        self._holds_changed = True
        self._hold_signals += 1

    @workflow.query
    def progress(self) -> BulkProgress:
        """Where the request stands, by counts."""
        return self._p

    # --- the process ----------------------------------------------------------------------

    @workflow.run
    async def run(self, request: BulkRequest) -> BulkProgress:
        self._overlap = workflow.patched(BATCHES_OVERLAP)
        p = self._p
        if p.plan is None:
            await self._plan(request)
        plan = p.plan
        assert plan is not None
        if p.phase == "discover":
            if not await self._discover(request, plan):
                workflow.continue_as_new(request.model_copy(update={"progress": p}))
            p.phase, p.cursor = "immediate", 0
        if p.started_at is None:
            if not await self._approved(request, plan):
                return await self._finish(request, "rejected")
            if p.cancelled_by is not None:  # before anything was erased
                return await self._finish(request, "cancelled")
            await self._start(request, plan)
        phases: list[BulkPhase] = ["immediate", "deferred", "recheck", "held"]
        for phase in phases[phases.index(p.phase) :]:
            if p.phase != phase:
                p.phase, p.cursor = phase, 0
            if phase == "recheck":
                if not await self._verify_pending(request, plan):
                    workflow.continue_as_new(request.model_copy(update={"progress": p}))
                continue
            steps = _steps(plan, phase)
            if phase == "deferred" and steps:
                self._state("waiting_window")
                await self._until_window_end_or_cancel()
            if not steps and phase != "held":
                continue
            if not await self._run_phase(request, steps or _steps(plan, "held")):
                workflow.continue_as_new(request.model_copy(update={"progress": p}))
        return await self._finish(request, "cancelled" if p.cancelled_by else "completed")

    async def _plan(self, request: BulkRequest) -> None:
        """Plan the tenant's erasure once and record the request."""
        p = self._p
        plan: Plan = await workflow.execute_local_activity(
            "bulk.plan",
            request,
            result_type=Plan,
            start_to_close_timeout=CONTROL_TIMEOUT,
            retry_policy=CONTROL_RETRY,
        )
        p.plan = plan
        p.deadline = add_months(p.received_at, plan.deadline_months)
        await self._ledger(
            request,
            "bulk.requested",
            {
                "subjects": request.total,
                "source": request.source,
                "reason": request.reason,
                "policy": plan.policy,
                "datamap_digest": plan.datamap_digest,
            },
        )

    async def _discover(self, request: BulkRequest, plan: Plan) -> bool:
        """Offboarding: find the tenant's subjects in every system that can list them, page
        by page, each page staged in Lethe's store (read only: nothing is touched). False when
        the run should continue as new."""
        p = self._p
        self._state("discovering")
        steps = [s for s in _steps(plan, "held") if s.kind in LISTS_SUBJECTS]
        while p.discover_step < len(steps) and p.cancelled_by is None:
            step = steps[p.discover_step]
            page: SubjectsPage = await workflow.execute_activity(
                f"{step.kind}.subjects",
                SubjectsQuery(
                    request_id=request.bulk_id,
                    tenant=request.tenant,
                    step=step,
                    after=p.discover_after,
                ),
                result_type=SubjectsPage,
                task_queue=task_queue(step.region, workflow.info().task_queue),
                start_to_close_timeout=CONNECTOR_TIMEOUT,
                retry_policy=CONNECTOR_RETRY,
                schedule_to_close_timeout=DISCOVERY_SPAN,
            )
            added: int = await workflow.execute_local_activity(
                "bulk.stage_found",
                BulkFound(bulk_id=request.bulk_id, subjects=page.subjects),
                result_type=int,
                start_to_close_timeout=CONTROL_TIMEOUT,
                retry_policy=CONTROL_RETRY,
            )
            p.discovered[step.id] = p.discovered.get(step.id, 0) + len(page.subjects)
            p.counts.total += added
            p.discover_after = page.next_after
            if page.next_after is None:
                p.discover_step += 1
            if self._run_full(request):
                return p.discover_step >= len(steps)
        self._run_batches = 0  # the run's batches are counted apart from its discovery pages
        found: Details = {f"found_{step}": n for step, n in sorted(p.discovered.items())}
        await self._ledger(request, "bulk.discovered", {"subjects": p.counts.total, **found})
        return True

    async def _approved(self, request: BulkRequest, plan: Plan) -> bool:
        """Wait for the DPO when the plan needs approval (an offboarding always does: its
        counts are shown before anything is destroyed). False when rejected."""
        p = self._p
        needed = plan.approval_required or request.source == "offboard"
        if needed and p.approval is None and p.cancelled_by is None:
            self._state("awaiting_approval")
            await workflow.wait_condition(
                lambda: (
                    p.approval is not None
                    or self._rejection is not None
                    or p.cancelled_by is not None
                )
            )
        if self._rejection is not None:
            await self._ledger(request, "bulk.rejected", actor=self._rejection.by)
            return False
        return True

    async def _start(self, request: BulkRequest, plan: Plan) -> None:
        """The erasure starts: the window runs from now."""
        p = self._p
        assert p.deadline is not None
        p.started_at = workflow.now()
        p.window_ends_at = window_end(
            p.started_at,
            plan.window_length,
            p.deadline,
            past_deadline=plan.window_ends_after_deadline,
        )
        await self._ledger(
            request,
            "bulk.started",
            {
                "subjects": p.counts.total,
                "approved_by": p.approval.by if p.approval else None,
                "window_ends_at": p.window_ends_at.isoformat(),
            },
        )

    async def _run_phase(self, request: BulkRequest, steps: list[Step]) -> bool:
        """Batches of this phase until none is left (True) or the run should continue as new."""
        if self._overlap:
            return await self._run_overlapped(request, steps)
        return await self._one_at_a_time(request, steps)

    async def _one_at_a_time(self, request: BulkRequest, steps: list[Step]) -> bool:
        """Runs before BATCHES_OVERLAP: take a batch, erase it, record it, then the next."""
        p = self._p
        while p.cancelled_by is None:
            if p.paused_by is not None and not await self._resumed(request):
                break
            batch = await self._next(request, steps)
            self._set_aside(batch)
            if batch.blocked_by:
                p.held_by = batch.blocked_by
                await self._wait_for_holds()
                continue
            p.held_by = []
            if not batch.subjects:
                if batch.last_seq == p.cursor:
                    if p.phase == "held" and p.counts.held:
                        await self._wait_for_holds()
                        p.cursor = 0
                        continue
                    return True
                p.cursor = batch.last_seq
                continue
            if p.phase not in p.preflighted:
                await self._preflighted(steps, batch.subjects[0])
                if p.cancelled_by is not None:
                    break
                p.preflighted.append(p.phase)
            self._state("erasing")
            outcomes = await self._erase(request, steps, batch, p.batches)
            await self._record(request, steps, batch, outcomes, p.batches)
            p.cursor = batch.last_seq
            if self._run_full(request):
                return False
        return True

    async def _resumed(self, request: BulkRequest) -> bool:
        """Paused: say so in the ledger and wait; True once resumed, False when cancelled."""
        p = self._p
        self._state("paused")
        await self._ledger(request, "bulk.paused", actor=p.paused_by)
        await workflow.wait_condition(lambda: p.paused_by is None or p.cancelled_by is not None)
        if p.cancelled_by is not None:
            return False
        await self._ledger(request, "bulk.resumed")
        return True

    async def _run_overlapped(self, request: BulkRequest, steps: list[Step]) -> bool:
        """Batches of this phase, the next one taken and the last one recorded while one
        erases (one batch erases at a time). Before a wait, the phase's end or a
        continue-as-new, the batch taken ahead is let go (its subjects are taken again from
        the cursor; what it set aside stays set aside) and the last record is awaited."""
        p = self._p
        overlap = _Overlap(request=request, taken_to=p.cursor, number=p.batches)
        while p.cancelled_by is None and not self._run_ended(request):
            if p.paused_by is not None:
                await self._settle(overlap)
                if not await self._resumed(request):
                    break
            batch = await self._taken(request, steps, overlap)
            if (batch.blocked_by or not batch.subjects) and overlap.busy:
                await self._settle(overlap)
                batch = await self._next(request, steps, overlap.taken_to)  # the counts of now
                self._set_aside(batch)
            if batch.blocked_by:
                p.held_by = batch.blocked_by
                await self._wait_for_holds()
                continue
            p.held_by = []
            if not batch.subjects:
                if batch.last_seq == p.cursor:
                    if p.phase == "held" and p.counts.held:
                        await self._wait_for_holds()
                        p.cursor = overlap.taken_to = 0
                        continue
                    return True
                p.cursor = overlap.taken_to = batch.last_seq
                continue
            if p.phase not in p.preflighted:
                await self._preflighted(steps, batch.subjects[0])
                if p.cancelled_by is not None:
                    break
                p.preflighted.append(p.phase)
            self._state("erasing")
            number = overlap.number
            overlap.number += 1
            erasing = asyncio.ensure_future(self._erase(request, steps, batch, number))
            overlap.taken_to = batch.last_seq
            self._run_batches += 1
            # A workflow task that runs local activities sends its commands only once they are
            # done: let the batch's activities go first (the task that schedules them ends),
            # and record the last batch and take the next one in the task that the first of
            # them to end starts, while the others still erase.
            await workflow.wait_condition(
                functools.partial(self._one_ended, self._steps_ended, erasing)
            )
            if overlap.unrecorded is not None:
                overlap.recording = asyncio.ensure_future(self._record_later(request, overlap))
            if not self._run_ended(request) and p.paused_by is None and p.cancelled_by is None:
                overlap.ahead = asyncio.ensure_future(self._ahead(request, steps, batch.last_seq))
            outcomes = await erasing
            if overlap.recording is not None:
                await overlap.recording
                overlap.recording = None
            overlap.unrecorded = _Erased(steps, batch, outcomes, number)
        await self._settle(overlap)
        return p.cancelled_by is not None or not self._run_ended(request)

    def _one_ended(self, ended: int, erasing: asyncio.Future[list[BatchStepOutcome]]) -> bool:
        """Whether a step activity ended since `ended` were, or the whole batch did."""
        return self._steps_ended > ended or erasing.done()

    async def _taken(self, request: BulkRequest, steps: list[Step], overlap: _Overlap) -> BulkBatch:
        """The batch taken ahead if it is still good (no hold signalled since; its counts only
        if no record came after it), else one taken now."""
        ahead, overlap.ahead = overlap.ahead, None
        if ahead is not None:
            taken = await ahead
            if taken.hold_signals == self._hold_signals:
                self._set_aside(taken.batch, counts=taken.records == self._records)
                return taken.batch
            await self._settle(overlap)
        batch = await self._next(request, steps, overlap.taken_to)
        self._set_aside(batch)
        return batch

    async def _ahead(self, request: BulkRequest, steps: list[Step], after: int) -> _Ahead:
        signals, records = self._hold_signals, self._records
        return _Ahead(await self._next(request, steps, after), signals, records)

    async def _settle(self, overlap: _Overlap) -> None:
        """Let the batch taken ahead go, and record the last batch erased."""
        if overlap.ahead is not None:
            await overlap.ahead
            overlap.ahead = None
        if overlap.recording is not None:
            await overlap.recording
            overlap.recording = None
        if overlap.unrecorded is not None:
            await self._record_later(overlap.request, overlap)
        overlap.taken_to = self._p.cursor

    async def _record_later(self, request: BulkRequest, overlap: _Overlap) -> None:
        """Record the batch erased last; the cursor moves past it."""
        erased, overlap.unrecorded = overlap.unrecorded, None
        assert erased is not None
        await self._record(request, erased.steps, erased.batch, erased.outcomes, erased.number)
        self._p.cursor = erased.batch.last_seq

    def _run_ended(self, request: BulkRequest) -> bool:
        """Whether this run has taken its `batches_per_run` (or Temporal suggests a new run)."""
        return (
            self._run_batches >= request.batches_per_run
            or workflow.info().is_continue_as_new_suggested()
        )

    async def _next(
        self, request: BulkRequest, steps: list[Step], after: int | None = None
    ) -> BulkBatch:
        """The next batch after `after` (default: the cursor)."""
        p = self._p
        batch: BulkBatch = await workflow.execute_local_activity(
            "bulk.next_batch",
            BulkBatchQuery(
                bulk_id=request.bulk_id,
                tenant=request.tenant,
                phase=p.phase,
                after_seq=p.cursor if after is None else after,
                size=request.batch_size,
                steps=steps,
                held_again=p.phase == "held",
            ),
            result_type=BulkBatch,
            start_to_close_timeout=CONTROL_TIMEOUT,
            retry_policy=CONTROL_RETRY,
        )
        return batch

    def _set_aside(self, batch: BulkBatch, *, counts: bool = True) -> None:
        """What the batch set aside; and its counts, unless told they are older than a record."""
        if counts:
            self._counted(batch.counts)
        missing = batch.set_aside.get("failed", 0)
        if missing and self._p.phase != "deferred":  # the deferred phase sees them again
            reason = "identity not known"
            self._p.failures[reason] = self._p.failures.get(reason, 0) + missing

    def _counted(self, statuses: dict[str, int]) -> None:
        """The subjects' counts as Lethe's store has them (the store is the truth)."""
        p = self._p
        p.counts = BulkCounts(
            total=p.counts.total,
            **{k: n for k, n in statuses.items() if k in BulkCounts.model_fields and k != "total"},
        )

    async def _wait_for_holds(self) -> None:
        """Wait until holds change (signal) or the backoff's timer, whichever is first. A
        signal that came while the last pass ran counts: the wait then ends at once."""
        self._state("on_hold")
        try:
            await workflow.wait_condition(
                lambda: self._holds_changed or self._p.cancelled_by is not None,
                timeout=self._hold_delay,
            )
            self._hold_delay = HELD_RECHECK[0]
        except TimeoutError:
            self._hold_delay = min(self._hold_delay * 2, HELD_RECHECK[1])
        self._holds_changed = False

    async def _preflighted(self, steps: list[Step], first: BulkSubject) -> None:
        """Check every step with the batch's first subject before anything is destroyed; on
        problems wait (backing off, or until `recheck`) and check again."""
        p = self._p
        delay = PREFLIGHT_RETRY[0]
        while p.cancelled_by is None:
            now = workflow.now()

            def request(step: Step, now: datetime = now) -> StepRequest:
                return BatchStepRequest(
                    request_id=p.bulk_id,
                    batch=p.batches,
                    step=step,
                    subjects=[first],
                    erasure_started_at=now,
                    window_ends_at=p.window_ends_at or now,
                ).single(first)

            checks = await preflight(steps, request)
            p.preflight = [check for check in checks if check.problems]
            if not p.preflight:
                return
            self._state("preflight_failed")
            self._recheck = False
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(
                    lambda: self._recheck or p.cancelled_by is not None, timeout=delay
                )
            delay = min(delay * 2, PREFLIGHT_RETRY[1])

    async def _erase(
        self, request: BulkRequest, steps: list[Step], batch: BulkBatch, number: int
    ) -> list[BatchStepOutcome]:
        """Every step of the phase for batch `number`, in parallel, each on its region's queue."""
        p = self._p
        assert p.started_at is not None and p.window_ends_at is not None

        async def one(step: Step) -> BatchStepOutcome:
            if step.action == "retain":
                return _retained(step, batch.subjects)
            work = BatchStepRequest(
                request_id=request.bulk_id,
                batch=number,
                step=step,
                subjects=batch.subjects,
                erasure_started_at=p.started_at or workflow.now(),
                window_ends_at=p.window_ends_at or workflow.now(),
                found=batch.found,
            )
            try:
                return await self._on_region(step, "erase_batch", work, f"{number}-{step.id}")
            except ActivityError as error:
                reason = failure_reason(error)
                return BatchStepOutcome(
                    step_id=step.id,
                    outcomes=[
                        SubjectOutcome(subject_ref=s.subject_ref, status="failed", detail=reason)
                        for s in batch.subjects
                    ],
                    detail=reason,
                )
            finally:
                self._steps_ended += 1

        return list(await asyncio.gather(*(one(step) for step in steps)))

    async def _record(
        self,
        request: BulkRequest,
        steps: list[Step],
        batch: BulkBatch,
        outcomes: list[BatchStepOutcome],
        number: int,
    ) -> None:
        p = self._p
        plan = p.plan
        assert plan is not None
        recorded: BulkRecorded = await workflow.execute_local_activity(
            "bulk.record_batch",
            BulkBatchRecord(
                bulk_id=request.bulk_id,
                tenant=request.tenant,
                phase=p.phase,
                batch=number,
                subjects=[s.subject_ref for s in batch.subjects],
                outcomes=outcomes,
                systems=sorted({step.system for step in _steps(plan, "held")}),
            ),
            result_type=BulkRecorded,
            start_to_close_timeout=CONTROL_TIMEOUT,
            retry_policy=CONTROL_RETRY,
        )
        p.batches += 1
        self._records += 1
        _add_totals(p, steps, outcomes)
        for reason, n in recorded.failures.items():
            p.failures[reason] = p.failures.get(reason, 0) + n
        self._counted(recorded.counts)

    async def _verify_pending(self, request: BulkRequest, plan: Plan) -> bool:
        """Once the window has ended, verify again each batch's step that left subjects
        `pending_compaction` (Kafka), as a single request's re-check does. False when the run
        should continue as new."""
        p = self._p
        waited = False
        while p.cancelled_by is None:
            found: BulkRecheck | None = await workflow.execute_local_activity(
                "bulk.next_recheck",
                request.bulk_id,
                result_type=BulkRecheck | None,  # type: ignore[arg-type]
                start_to_close_timeout=CONTROL_TIMEOUT,
                retry_policy=CONTROL_RETRY,
            )
            if found is None:
                return True
            if not waited:
                self._state("waiting_window")
                await self._until_window_end_or_cancel()
                waited = True
                continue  # look again: nothing is lost by asking twice
            step = next(s for s in _steps(plan, "held") if s.id == found.step_id)
            self._state("verifying")
            verified = await self._verify_again(request, step, found)
            recorded: BulkRecorded = await workflow.execute_local_activity(
                "bulk.record_recheck",
                BulkRecheckRecord(
                    bulk_id=request.bulk_id,
                    tenant=request.tenant,
                    batch=p.batches,
                    of_batch=found.batch,
                    verified=verified,
                ),
                result_type=BulkRecorded,
                start_to_close_timeout=CONTROL_TIMEOUT,
                retry_policy=CONTROL_RETRY,
            )
            p.batches += 1
            _move_totals(p, found.erased, verified)
            self._counted(recorded.counts)
            if self._run_full(request):
                return False
        return True

    async def _verify_again(
        self, request: BulkRequest, step: Step, found: BulkRecheck
    ) -> BatchStepOutcome:
        p = self._p
        assert p.started_at is not None and p.window_ends_at is not None
        work = VerifyBatch(
            request=BatchStepRequest(
                request_id=request.bulk_id,
                batch=found.batch,
                step=step,
                subjects=found.subjects,
                erasure_started_at=p.started_at,
                window_ends_at=p.window_ends_at,
            ),
            erased=found.erased,
        )
        try:
            return await self._on_region(
                step, "verify_batch", work, f"recheck-{found.batch}-{step.id}"
            )
        except ActivityError as error:
            reason = failure_reason(error)
            return found.erased.model_copy(
                update={
                    "outcomes": [
                        o.model_copy(update={"status": "failed", "detail": reason})
                        if o.status == "pending_compaction"
                        else o
                        for o in found.erased.outcomes
                    ]
                }
            )

    async def _on_region(
        self, step: Step, operation: str, work: BatchStepRequest | VerifyBatch, activity_id: str
    ) -> BatchStepOutcome:
        """`<kind>.<operation>` of a step on its region's queue, with the regional erasure's
        timeouts, retrying until three days before the deadline (at least an hour)."""
        assert self._p.deadline is not None
        span = max(self._p.deadline - RETRY_MARGIN - workflow.now(), MIN_RETRY_SPAN)
        done: BatchStepOutcome = await workflow.execute_activity(
            f"{step.kind}.{operation}",
            work,
            result_type=BatchStepOutcome,
            task_queue=task_queue(step.region, workflow.info().task_queue),
            activity_id=activity_id,
            start_to_close_timeout=CONNECTOR_TIMEOUT,
            schedule_to_close_timeout=span,
            heartbeat_timeout=CONNECTOR_HEARTBEAT,
            retry_policy=CONNECTOR_RETRY,
        )
        return done

    async def _until_window_end_or_cancel(self) -> None:
        p = self._p
        assert p.window_ends_at is not None
        wait = p.window_ends_at - workflow.now()
        if wait > timedelta(0):
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(lambda: p.cancelled_by is not None, timeout=wait)

    async def _finish(self, request: BulkRequest, state: BulkState) -> BulkProgress:
        p = self._p
        p.completed_at = workflow.now()
        self._state(state)
        counts: Details = {f"subjects_{k}": v for k, v in p.counts.model_dump().items()}
        await self._ledger(
            request, f"bulk.{state}", {"batches": p.batches, **counts}, actor=p.cancelled_by
        )
        await workflow.execute_local_activity(
            "bulk.finish",
            p,
            start_to_close_timeout=CONTROL_TIMEOUT,
            retry_policy=CONTROL_RETRY,
        )
        return p

    # --- small helpers -------------------------------------------------------------------

    def _run_full(self, request: BulkRequest) -> bool:
        """Count one batch (or discovery page) of this run; whether the run should now continue
        as new (`batches_per_run` of them, or Temporal suggests it)."""
        self._run_batches += 1
        return self._run_ended(request)

    def _state(self, state: BulkState) -> None:
        if self._p.state != state:
            self._p.state = state
            workflow.upsert_search_attributes([sa.STATUS.value_set(state)])

    async def _ledger(
        self,
        request: BulkRequest,
        action: str,
        details: Details | None = None,
        *,
        actor: str | None = None,
    ) -> None:
        """One ledger entry of the request (subject reference `-`: counts, never subjects)."""
        self._actions += 1
        key = f"{request.bulk_id}/{action}/{workflow.info().run_id}/{self._actions}"
        await workflow.execute_local_activity(
            "ledger.record",
            [
                LedgerRecord(
                    idempotency_key=key,
                    request_id=request.bulk_id,
                    subject_ref="-",
                    actor=actor or request.requested_by,
                    action=action,
                    details=details or {},
                    tenant=request.tenant,
                )
            ],
            result_type=list[str],
            start_to_close_timeout=CONTROL_TIMEOUT,
            retry_policy=CONTROL_RETRY,
        )


def _steps(plan: Plan, phase: BulkPhase) -> list[Step]:
    """The plan's steps a phase runs: `held` (subjects taken after a hold) runs every step."""
    steps = [step for region in plan.regions for step in region.steps]
    if phase == "held":
        return steps
    return [step for step in steps if step.phase == phase]


def _retained(step: Step, subjects: Sequence[BulkSubject]) -> BatchStepOutcome:
    basis = "; ".join(d.exception or d.citation for d in step.decisions if d.strategy == "retain")
    return BatchStepOutcome(
        step_id=step.id,
        outcomes=[
            SubjectOutcome(subject_ref=s.subject_ref, status="retained", detail=f"kept: {basis}")
            for s in subjects
        ],
    )


def _move_totals(p: BulkProgress, before: BatchStepOutcome, after: BatchStepOutcome) -> None:
    """A step verified again: its subjects move from the statuses they had to the new ones."""
    total = next((t for t in p.steps if t.step_id == after.step_id), None)
    if total is None:
        return
    for was, now in zip(before.outcomes, after.outcomes, strict=False):
        total.statuses[was.status] = total.statuses.get(was.status, 0) - 1
        total.statuses[now.status] = total.statuses.get(now.status, 0) + 1
    total.statuses = {k: n for k, n in total.statuses.items() if n}


def _add_totals(p: BulkProgress, steps: list[Step], outcomes: list[BatchStepOutcome]) -> None:
    by_id = {total.step_id: total for total in p.steps}
    for step, outcome in zip(steps, outcomes, strict=True):
        total = by_id.get(step.id)
        if total is None:
            total = BulkStepTotals(step_id=step.id, system=step.system, phase=step.phase)
            p.steps.append(total)
            by_id[step.id] = total
        for one in outcome.outcomes:
            total.statuses[one.status] = total.statuses.get(one.status, 0) + 1
        total.affected += outcome.affected


@dataclass
class _Ahead:
    """A batch taken while another erased, with what had happened when it was asked for."""

    batch: BulkBatch
    hold_signals: int
    records: int


@dataclass(frozen=True)
class _Erased:
    """A batch erased and not yet recorded."""

    steps: list[Step]
    batch: BulkBatch
    outcomes: list[BatchStepOutcome]
    number: int


@dataclass
class _Overlap:
    """A phase's batches in flight beside the one erasing."""

    request: BulkRequest
    taken_to: int
    """The last place taken (erasing or recorded): the batch after it is taken next."""
    number: int
    """The number the next batch to erase gets."""
    ahead: asyncio.Task[_Ahead] | None = None
    unrecorded: _Erased | None = None
    recording: asyncio.Task[None] | None = None

    @property
    def busy(self) -> bool:
        """Whether a batch is taken ahead, or one erased is not recorded yet."""
        return any(x is not None for x in (self.ahead, self.unrecorded, self.recording))
