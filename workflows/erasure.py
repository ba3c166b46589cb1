"""The right-to-erasure workflow: plan, approve, respect holds, erase by region, verify, certify.

Workflow id `erasure-<subject reference>`, so a second request for the same subject joins the
running one. It runs on the control queue (and so do its planning, hold, ledger and certificate
activities); each region's preflight and steps run as activities on that region's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from lethe.contracts import (
        ApprovalDecision,
        Certificate,
        ErasureStart,
        ErasureState,
        ErasureStatus,
        Extension,
        ForgetListAdd,
        HoldQuery,
        LedgerRecord,
        Outcome,
        Phase,
        Plan,
        RegionJob,
        RegionPlan,
        RetryOf,
        Step,
        StepCheck,
        StepOutcome,
        StepProgress,
        StepRequest,
    )
    from lethe.kernel.deadlines import add_months, format_duration, window_end
    from lethe.kernel.errors import failure_reason
    from lethe.kernel.regions import task_queue
    from lethe.temporal import search_attributes as sa
    from lethe.workflows.regional_erasure import RegionalErasureWorkflow, step_outcome

CONTROL_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=20,
)
CONTROL_TIMEOUT = timedelta(seconds=60)
HOLD_RECHECK = timedelta(hours=1)
"""Held steps are re-checked this often even if no `holds_changed` signal arrives (runs before
HOLD_BACKOFF)."""
HOLD_RECHECK_MAX = timedelta(days=1)
"""With HOLD_BACKOFF, the re-check interval doubles from HOLD_RECHECK up to this."""

DONE_STATES = ("done", "retained")
SHRED_EVIDENCE_IN_LEDGER = "shred-evidence-in-ledger"
"""Retired patch: it landed with the shred step itself, so no run has a shred step without it. A
shred step's ledger entry always carries its evidence; runs before PATCHES_FIRST recorded the
marker where their first shred outcome arrived, and `deprecate_patch` there accepts it."""
PREFLIGHT = "preflight-before-destruction"
"""Patch: every step is checked by its region's worker before anything is destroyed."""
PREFLIGHT_TIMEOUT = timedelta(minutes=2)
"""How long a region's worker has to answer a preflight (none running: the check fails)."""
PREFLIGHT_RETRY = (timedelta(seconds=30), timedelta(hours=1))
"""A failed preflight is tried again after the first delay, doubling up to the second."""
PREFLIGHT_FRESH = timedelta(minutes=1)
"""A preflight older than this (approval, holds) is repeated before the first destruction."""
RETRY_MARGIN = timedelta(days=3)
"""Steps stop retrying this long before the Art. 12(3) deadline, so a DPO can still act."""
SUBJECT_FOUND = "whole-backups-only-when-found"
"""Patch: whole backups are touched only when the subject was found or is on the forget-list."""
WINDOW_BY_DEADLINE = "window-ends-by-deadline"
"""Patch: the window ends at the Art. 12(3) deadline when that comes first, unless the plan
says it may end after it."""
RETRY_FAILED_STEPS = "retry-failed-steps"
"""Patch: a request with `retry_of` re-runs only those steps, under the original approval and
window."""
HOLD_BACKOFF = "hold-recheck-backoff"
"""Patch: held steps are re-checked after 1 h, 2 h, ... up to a day (a release signals at once),
so a hold of years adds a few thousand events to the history, not one batch an hour."""
PATCHES_FIRST = "patches-decided-first"
"""Patch: every patch above is taken in the run's first activation, before any local activity.

A patch first decided right after a local activity can replay differently from how it ran: when
a query forces a workflow task to complete while a local activity is finishing, the activity's
marker lands in that task and its result reaches the workflow in the next one; on replay the
result comes back one task early, before the server's patch markers of the next task are known,
so the patch reads as absent (a nondeterminism error; every `lethe status` right after a submit
could cause it). A run that took this patch has no marker of the patches above; older runs
still decide each where they did. A new patch is decided at the top of `run` too (HOLD_BACKOFF)."""
STEPS_FROM_PARENT = "steps-from-parent"
"""Patch: the request schedules each step's activity on its region's queue itself, and checks
each region's steps in one `region.preflight` activity, instead of one child workflow per region
and one preflight activity per step (measured in `bench/erasure.py`). Runs started before it
keep their children (`RegionalErasureWorkflow`). It is decided first, and a run that takes it
takes every patch above without deciding them: one marker (and one upsert of the server's
TemporalChangeVersion search attribute, which every marker brings) instead of three."""


@workflow.defn
class ErasureWorkflow:
    """Erase one subject everywhere the data map says their data lives."""

    @workflow.init
    def __init__(self, start: ErasureStart) -> None:
        # The status answers from the first moment, before the first workflow task has run.
        self._status: ErasureStatus = _received(start)
        self._approval: ApprovalDecision | None = None
        self._rejection: ApprovalDecision | None = None
        self._holds_changed = False
        self._outcomes: dict[str, StepOutcome] = {}
        self._ledger_hashes: list[str] = []
        self._extension_recorded = False
        self._recheck = False
        self._preflight_at: datetime | None = None
        self._subject_found = True
        self._patches_first = False
        self._hold_backoff = False
        self._from_parent = False
        self._plan_now: Plan | None = None

    # --- signals and the query ------------------------------------------------------------

    @workflow.signal
    def approve(self, decision: ApprovalDecision) -> None:
        """The DPO approves the plan."""
        if self._rejection is None:
            self._approval = decision

    @workflow.signal
    def reject(self, decision: ApprovalDecision) -> None:
        """The DPO rejects the request (before erasure has started)."""
        if self._approval is None:
            self._rejection = decision

    @workflow.signal
    def extend(self, extension: Extension) -> None:
        """Extend the Art. 12(3) deadline by up to two months, once, with a recorded reason."""
        status = self._status
        if status.extension is not None:
            return
        self._set(
            extension=extension,
            deadline=add_months(status.deadline, extension.months),
            overdue=False,
        )

    @workflow.signal
    def recheck(self) -> None:
        """The DPO fixed what the preflight found: check again now, not at the next retry."""
        self._recheck = True

    @workflow.signal
    def holds_changed(self) -> None:
        """A hold was released (or placed): re-check held steps now."""
        self._holds_changed = True

    @workflow.query
    def status(self) -> ErasureStatus:
        """Where the request stands, step by step."""
        return self._status

    @workflow.query
    def plan(self) -> Plan | None:
        """The plan the request follows (each step's action and legal basis); None until it
        is planned."""
        return self._plan_now

    # --- the process ----------------------------------------------------------------------

    @workflow.run
    async def run(self, start: ErasureStart) -> Certificate:
        # A run that takes STEPS_FROM_PARENT takes every patch before it, with no marker of
        # theirs (each marker also costs an upsert of TemporalChangeVersion).
        self._from_parent = workflow.patched(STEPS_FROM_PARENT)
        self._patches_first = self._from_parent or workflow.patched(PATCHES_FIRST)
        self._hold_backoff = self._from_parent or workflow.patched(HOLD_BACKOFF)
        request = start.request
        retry = self._retry_of(start)
        # A retry answers the original request: its deadline (and extension) still count.
        self._extension_recorded = retry is not None and retry.extension is not None
        plan = await self._plan(start)
        if retry is None:
            deadline = add_months(start.received_at, plan.deadline_months)
            extension = self.status().extension
            if extension is not None:  # extended while planning
                deadline = add_months(deadline, extension.months)
        else:
            deadline = retry.deadline
        self._set(
            deadline=deadline,
            approval_required=plan.approval_required,
            steps=[_progress(step) for step in plan.steps],
        )
        workflow.upsert_search_attributes(
            [
                sa.REGIONS.value_set([r.region for r in plan.regions]),
                sa.DEADLINE.value_set(deadline),
            ]
        )
        checked = self._patched(PREFLIGHT)
        if request.dry_run:
            # The same preflight an erasure runs, once, touching nothing.
            checks = await self._preflight(start, plan, plan.steps) if checked else []
            self._set(preflight=[check for check in checks if not check.ready])
            return await self._finish(start, plan, "dry_run", "dry_run", None, preflight=checks)

        entries = [
            self._entry(
                start, "erasure.requested", {"policy": plan.policy, "by": request.requested_by}
            )
            if retry is None
            else self._retried(start, retry, plan)
        ]
        if checked:
            # Before anyone approves: a map or a system that is wrong shows now, and a fixed
            # map is planned again.
            plan = await self._until_ready(start, plan, replan=True)
        if request.replay_of is not None:
            # Re-applying an approved erasure to a restored system: at once, no new approval.
            entries.append(self._entry(start, "erasure.replayed", {"replay_of": request.replay_of}))
        elif retry is not None and (retry.approval is not None or not plan.approval_required):
            # The original approval stands (recorded in `erasure.retried`): no new one.
            self._set(approval=retry.approval)
        elif plan.approval_required:
            await self._record(*entries)
            decision = await self._decision(start)
            approved = self._approval is not None
            entries = [
                self._entry(
                    start,
                    "erasure.approved" if approved else "erasure.rejected",
                    {"by": decision.by},
                    actor=decision.by,
                )
            ]
            if not approved:
                return await self._finish(start, plan, "rejected", "rejected", None, entries)

        started_at = workflow.now()
        # A retry keeps the original erasure's start and window: deferred steps whose window
        # has passed run at once.
        window_start = started_at if retry is None else retry.started_at
        window_ends_at = window_start + plan.window_length
        started: dict[str, str | int | float | bool | None] = {"window_days": plan.window_days}
        if self._patched(WINDOW_BY_DEADLINE):
            deadline = self.status().deadline
            window_ends_at = window_end(
                window_start,
                plan.window_length,
                deadline,
                past_deadline=plan.window_ends_after_deadline,
            )
            started.update(
                window=format_duration(plan.window_length),
                window_ends_at=window_ends_at.isoformat(),
                window_ends_after_deadline=window_ends_at > deadline,
                window_cut_to_deadline=window_ends_at < window_start + plan.window_length,
            )
        # A replay restores an erasure already made: nothing to wait for, so its backups and
        # logs go at once; Kafka's removal is still judged against a full window.
        replay = request.replay_of is not None
        self._set(window_ends_at=window_ends_at)
        await self._record(*entries, self._entry(start, "erasure.started", started))

        window = (window_start, window_ends_at)
        await self._run_steps(start, plan, _in_phase(plan, "immediate"), window, "immediate")

        if self._patched(SUBJECT_FOUND):
            # Data that holds everyone (whole backups) is touched only for a subject that was
            # found somewhere, or was erased before: never for an id that exists nowhere.
            self._subject_found = any(o.affected > 0 for o in self._outcomes.values())
            if not self._subject_found:
                self._subject_found = await workflow.execute_local_activity(
                    "forget_list.listed",
                    start.subject_ref,
                    result_type=bool,
                    start_to_close_timeout=CONTROL_TIMEOUT,
                    retry_policy=CONTROL_RETRY,
                )

        if _in_phase(plan, "deferred"):
            self._set_state("waiting_window")
            if not replay:
                await workflow.sleep(max(window_ends_at - workflow.now(), timedelta(0)))
            await self._run_steps(start, plan, _in_phase(plan, "deferred"), window, "deferred")

        pending = [
            step
            for step in plan.steps
            if self._outcomes.get(step.id)
            and self._outcomes[step.id].status == "pending_compaction"
        ]
        if pending and not replay:
            # By the end of the window, compaction should have removed what the tombstones cover.
            self._set_state("verifying")
            await workflow.sleep(max(window_ends_at - workflow.now(), timedelta(0)))
            await self._run_steps(start, plan, pending, window, "recheck")

        outcome = _overall([self._outcomes[s.id] for s in plan.steps if s.id in self._outcomes])
        return await self._finish(start, plan, "completed", outcome, started_at)

    async def _decision(self, start: ErasureStart) -> ApprovalDecision:
        """Wait for the DPO's approval or rejection, flagging the deadline when it passes."""
        self._set_state("awaiting_approval")
        while self._approval is None and self._rejection is None:
            deadline = self.status().deadline
            remaining = deadline - workflow.now()
            if remaining <= timedelta(0) and not self.status().overdue:
                self._set(overdue=True)
                await self._record(
                    self._entry(
                        start,
                        "erasure.deadline_missed",
                        {"deadline": deadline.isoformat()},
                        key=f"deadline_missed/{deadline.isoformat()}",
                    )
                )
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(
                    functools.partial(self._decided_or_moved, deadline),
                    timeout=remaining if remaining > timedelta(0) else None,
                )
            await self._record_extension(start)
        decision = self._approval or self._rejection
        assert decision is not None
        self._set(approval=decision)
        return decision

    async def _record_extension(self, start: ErasureStart) -> None:
        """Write the extension to the ledger once: months and who, not the free-text reason."""
        extension = self.status().extension
        if extension is not None and not self._extension_recorded:
            self._extension_recorded = True
            deadline = self.status().deadline.isoformat()
            details: dict[str, str | int | float | bool | None] = {
                "months": extension.months,
                "by": extension.by,
                "deadline": deadline,
            }
            await self._record(self._entry(start, "erasure.extended", details, actor=extension.by))

    def _decided_or_moved(self, deadline: datetime) -> bool:
        """The DPO has decided, or the deadline moved (an extension)."""
        decided = self._approval is not None or self._rejection is not None
        return decided or self.status().deadline != deadline

    async def _run_steps(
        self,
        start: ErasureStart,
        plan: Plan,
        steps: list[Step],
        window: tuple[datetime, datetime],
        label: str,
    ) -> None:
        """Run steps region by region in parallel; steps under a hold wait for its release.

        `label` names the pass (`immediate`, `deferred`, or `recheck`, which only verifies
        steps already erased) in child workflow ids and ledger keys.
        """
        remaining = list(steps)
        round_no = 0
        recheck = HOLD_RECHECK
        while remaining:
            held = await workflow.execute_local_activity(
                "holds.blocking",
                HoldQuery(
                    subject_ref=start.subject_ref,
                    tenant=start.request.subject.tenant,
                    steps=remaining,
                ),
                result_type=dict[str, list[str]],
                start_to_close_timeout=CONTROL_TIMEOUT,
                retry_policy=CONTROL_RETRY,
            )
            ready = [step for step in remaining if step.id not in held]
            for step in remaining:
                if step.id in held:
                    self._update_step(step.id, status="held", holds=held[step.id])
            if ready and label != "recheck" and self._patched(PREFLIGHT):
                # Time has passed since the last check (approval, holds, the window): check
                # again what is about to be destroyed.
                await self._until_ready(start, plan, replan=False, steps=ready)
            if ready:
                self._set_state("erasing")
                await self._dispatch(start, ready, window, f"{label}-{round_no}")
            remaining = [step for step in remaining if step.id in held]
            if remaining:
                self._set_state("on_hold")
                self._holds_changed = False
                with contextlib.suppress(TimeoutError):
                    await workflow.wait_condition(lambda: self._holds_changed, timeout=recheck)
                if self._hold_backoff:
                    recheck = HOLD_RECHECK if self._holds_changed else recheck * 2
                    recheck = min(recheck, HOLD_RECHECK_MAX)
            round_no += 1

    async def _dispatch(
        self,
        start: ErasureStart,
        steps: list[Step],
        window: tuple[datetime, datetime],
        label: str,
    ) -> None:
        """Run `steps` (each region's at once, the regions in parallel) and record their
        outcomes in the ledger in one call."""
        for step in steps:
            self._update_step(step.id, status="running", holds=[])
        regions = sorted({step.region for step in steps})
        jobs = [self._job(start, steps, region, window, label) for region in regions]
        if self._from_parent:
            found = await asyncio.gather(
                *(self._step(job, step) for job in jobs for step in job.steps)
            )
        else:
            found = [o for outcomes in await self._children(jobs, label) for o in outcomes]
        entries = []
        for outcome in found:
            self._outcomes[outcome.step_id] = outcome
            self._update_step(outcome.step_id, status=outcome.status, detail=outcome.detail)
            step = next(s for s in steps if s.id == outcome.step_id)
            details: dict[str, str | int | float | bool | None] = {
                "step": step.id,
                "action": step.action,
                "affected": outcome.affected,
                "verified": outcome.verified,
            }
            if step.action == "shred":
                if not self._patches_first:
                    workflow.deprecate_patch(SHRED_EVIDENCE_IN_LEDGER)
                # Key destruction leaves no trace in any data system: the hash-chained
                # ledger keeps its proof (versions destroyed, when, the canary's fate).
                details.update({f"evidence.{k}": v for k, v in outcome.evidence.items()})
            entries.append(
                self._entry(
                    start,
                    f"step.{outcome.status}",
                    details,
                    system=step.system,
                    key=f"{step.id}/{label}",
                )
            )
        await self._record(*entries)

    def _job(
        self,
        start: ErasureStart,
        steps: list[Step],
        region: str,
        window: tuple[datetime, datetime],
        label: str,
    ) -> RegionJob:
        """One region's share of `steps` (a re-check carries what each step erased)."""
        return RegionJob(
            request_id=start.request_id,
            subject_ref=start.subject_ref,
            subject=start.request.subject,
            steps=[step for step in steps if step.region == region],
            erasure_started_at=window[0],
            window_ends_at=window[1],
            erased={
                step.id: self._outcomes[step.id]
                for step in steps
                if label.startswith("recheck") and step.id in self._outcomes
            },
            retry_until=self._retry_until(),
            subject_found=self._subject_found,
        )

    async def _step(self, job: RegionJob, step: Step) -> StepOutcome:
        """One step's activity on its region's queue, its activity id the step's id (so
        `lethe status` finds its retries); its status shows as soon as it ends."""
        outcome = await step_outcome(
            job, step, lambda: step.id, task_queue(step.region, workflow.info().task_queue)
        )
        self._update_step(step.id, status=outcome.status, detail=outcome.detail)
        return outcome

    async def _children(self, jobs: list[RegionJob], label: str) -> list[list[StepOutcome]]:
        """Runs started before STEPS_FROM_PARENT: one child workflow per region's job."""
        info = workflow.info()
        regions = [job.steps[0].region for job in jobs]
        children = [f"{info.workflow_id}-{region}-{info.run_id[:8]}-{label}" for region in regions]
        self._set(children=children)
        outcomes = await asyncio.gather(
            *(
                workflow.execute_child_workflow(
                    RegionalErasureWorkflow.run,
                    job,
                    id=child_id,
                    task_queue=task_queue(region, info.task_queue),
                )
                for job, region, child_id in zip(jobs, regions, children, strict=True)
            )
        )
        self._set(children=[])
        return list(outcomes)

    async def _plan(self, start: ErasureStart) -> Plan:
        """Plan the request from the data map and policy the control worker holds now."""
        plan: Plan = await workflow.execute_local_activity(
            "planning.plan",
            args=[start.request, start.request_id, start.subject_ref],
            result_type=Plan,
            start_to_close_timeout=CONTROL_TIMEOUT,
            retry_policy=CONTROL_RETRY,
        )
        retry = self._retry_of(start)
        self._plan_now = plan if retry is None else _retry_plan(plan, retry)
        return self._plan_now

    async def _until_ready(
        self, start: ErasureStart, plan: Plan, *, replan: bool, steps: list[Step] | None = None
    ) -> Plan:
        """Preflight every step (or `steps`) until none has a problem; the plan that passed.

        While something fails, the request waits in `preflight_failed` with the problems in
        its status, and tries again with backoff (at once on the `recheck` signal); with
        `replan`, each try plans afresh, so a corrected data map is picked up.
        """
        fresh = self._preflight_at is not None and (
            workflow.now() - self._preflight_at < PREFLIGHT_FRESH
        )
        if steps is not None and fresh:
            return plan
        delay, tries = PREFLIGHT_RETRY[0], 0
        while True:
            checks = await self._preflight(start, plan, plan.steps if steps is None else steps)
            failing = [check for check in checks if not check.ready]
            if not failing:
                self._preflight_at = workflow.now()
                self._set(preflight=[], next_preflight_at=None)
                if tries:
                    await self._record(
                        self._entry(
                            start,
                            "erasure.preflight_passed",
                            {"tries": tries + 1},
                            key=f"preflight_passed/{workflow.now().isoformat()}",
                        )
                    )
                return plan
            if tries == 0:
                await self._record(
                    self._entry(
                        start,
                        "erasure.preflight_failed",
                        {"steps": len(failing), "first": failing[0].step_id},
                        key=f"preflight_failed/{workflow.now().isoformat()}",
                    )
                )
            self._set_state("preflight_failed")
            self._set(preflight=failing, next_preflight_at=workflow.now() + delay)
            self._recheck = False
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(lambda: self._recheck, timeout=delay)
            delay, tries = min(delay * 2, PREFLIGHT_RETRY[1]), tries + 1
            if replan:
                plan = await self._plan(start)
                self._set(
                    steps=[_progress(step) for step in plan.steps],
                    approval_required=plan.approval_required,
                )

    async def _preflight(
        self, start: ErasureStart, plan: Plan, steps: list[Step]
    ) -> list[StepCheck]:
        """Each step checked by its own region's worker, in parallel, touching nothing."""
        now = workflow.now()
        check = preflight_by_region if self._from_parent else preflight
        return await check(
            steps,
            lambda step: StepRequest(
                request_id=start.request_id,
                subject_ref=start.subject_ref,
                subject=start.request.subject,
                step=step,
                erasure_started_at=now,
                window_ends_at=now + plan.window_length,
            ),
        )

    def _retry_until(self) -> datetime:
        """Until when steps retry transient failures: a margin before the deadline."""
        return self.status().deadline - RETRY_MARGIN

    async def _finish(
        self,
        start: ErasureStart,
        plan: Plan,
        state: ErasureState,
        outcome: Outcome,
        started_at: datetime | None,
        closing: list[LedgerRecord] | None = None,
        preflight: list[StepCheck] | None = None,
    ) -> Certificate:
        """Close the request: the closing ledger entries, the certificate, the forget-list."""
        await self._record_extension(start)
        status = self.status()
        self._set_state(state)
        if outcome != "dry_run":
            await self._record(
                *(
                    closing
                    or [self._entry(start, f"erasure.{outcome}", {"steps": len(self._outcomes)})]
                )
            )
        certificate = Certificate(
            request_id=start.request_id,
            subject_ref=start.subject_ref,
            tenant=plan.tenant,
            outcome=outcome,
            policy=plan.policy,
            datamap_digest=plan.datamap_digest,
            requested_by=start.request.requested_by,
            reason=start.request.reason,
            received_at=start.received_at,
            deadline=status.deadline,
            extension=status.extension,
            approval=status.approval,
            started_at=started_at,
            completed_at=workflow.now(),
            plan=plan,
            steps=[self._outcomes[s.id] for s in plan.steps if s.id in self._outcomes],
            ledger_hashes=list(self._ledger_hashes),
            preflight=preflight or [],
        )
        if outcome != "dry_run":
            await workflow.execute_local_activity(
                "certificate.issue",
                certificate,
                start_to_close_timeout=CONTROL_TIMEOUT,
                retry_policy=CONTROL_RETRY,
            )
        if outcome not in ("dry_run", "rejected") and start.request.replay_of is None:
            await workflow.execute_local_activity(
                "forget_list.add",
                ForgetListAdd(
                    subject=start.request.subject,
                    subject_ref=start.subject_ref,
                    request_id=start.request_id,
                    systems=sorted({step.system for step in plan.steps}),
                ),
                start_to_close_timeout=CONTROL_TIMEOUT,
                retry_policy=CONTROL_RETRY,
            )
        return certificate

    # --- helpers --------------------------------------------------------------------------

    @staticmethod
    def _entry(
        start: ErasureStart,
        action: str,
        details: dict[str, str | int | float | bool | None],
        *,
        system: str | None = None,
        key: str | None = None,
        actor: str | None = None,
    ) -> LedgerRecord:
        """A ledger entry of this request; `key` (default: the action) makes retries harmless;
        the actor is the requester unless someone else (the approver) acted."""
        return LedgerRecord(
            idempotency_key=f"{start.request_id}/{key or action}",
            request_id=start.request_id,
            subject_ref=start.subject_ref,
            actor=actor or start.request.requested_by,
            action=action,
            system=system,
            details=details,
            tenant=start.request.subject.tenant,
        )

    def _retried(self, start: ErasureStart, retry: RetryOf, plan: Plan) -> LedgerRecord:
        """The retry's first ledger entry: who asked, what it retries, and the approval that
        stands (the actor is the one who asked for the retry)."""
        details: dict[str, str | int | float | bool | None] = {
            "retry_of": retry.request_id,
            "steps": ",".join(retry.steps),
            "policy": plan.policy,
            "approval": "stands" if retry.approval is not None else "none was required",
            "approved_by": retry.approval.by if retry.approval is not None else None,
        }
        return self._entry(start, "erasure.retried", details)

    async def _record(self, *entries: LedgerRecord) -> None:
        """Append entries to the ledger in one call, in order."""
        if not entries:
            return
        hashes = await workflow.execute_local_activity(
            "ledger.record",
            list(entries),
            result_type=list[str],
            start_to_close_timeout=CONTROL_TIMEOUT,
            retry_policy=CONTROL_RETRY,
        )
        self._ledger_hashes.extend(hashes)

    def _set(self, **changes: object) -> None:
        self._status = self.status().model_copy(update=changes)

    def _set_state(self, state: ErasureState) -> None:
        """Move to `state`, in the status query and in the LetheStatus search attribute."""
        if self.status().state != state:
            self._set(state=state)
            workflow.upsert_search_attributes([sa.STATUS.value_set(state)])

    def _patched(self, patch: str) -> bool:
        """Whether this run takes `patch`: always if it decided its patches first (see
        PATCHES_FIRST), else as recorded where older runs decided it."""
        return self._patches_first or workflow.patched(patch)

    def _retry_of(self, start: ErasureStart) -> RetryOf | None:
        """What the request retries, if it is a retry."""
        retry = start.request.retry_of
        if retry is None or not self._patched(RETRY_FAILED_STEPS):
            return None
        return retry

    def _update_step(self, step_id: str, **changes: object) -> None:
        steps = [
            step.model_copy(update=changes) if step.step_id == step_id else step
            for step in self.status().steps
        ]
        self._set(steps=steps)


def _retry_plan(plan: Plan, retry: RetryOf) -> Plan:
    """The fresh plan narrowed to the retried steps; a step it no longer has fails the retry
    before anything is touched."""
    wanted = set(retry.steps)
    missing = sorted(wanted - {step.id for step in plan.steps})
    if missing:
        raise ApplicationError(
            f"cannot retry {', '.join(missing)} of {retry.request_id}: the plan made now from "
            "the data map no longer has them; retry the others with --step, or erase anew",
            type="RetryNotPlanned",
            non_retryable=True,
        )
    regions = [
        RegionPlan(region=region.region, steps=[s for s in region.steps if s.id in wanted])
        for region in plan.regions
    ]
    return plan.model_copy(
        update={"regions": [r for r in regions if r.steps], "retry_of": retry.request_id}
    )


def _received(start: ErasureStart) -> ErasureStatus:
    """The status of a request just received: planning, with its Art. 12(3) deadline (a
    retry's is the original request's)."""
    retry = start.request.retry_of
    return ErasureStatus(
        request_id=start.request_id,
        subject_ref=start.subject_ref,
        state="planning",
        received_at=start.received_at,
        deadline=add_months(start.received_at, 1) if retry is None else retry.deadline,
        extension=None if retry is None else retry.extension,
    )


def _in_phase(plan: Plan, phase: Phase) -> list[Step]:
    return [step for step in plan.steps if step.phase == phase]


def _progress(step: Step) -> StepProgress:
    return StepProgress(
        step_id=step.id,
        system=step.system,
        kind=step.kind,
        region=step.region,
        action=step.action,
        phase=step.phase,
        status="planned",
    )


def _overall(outcomes: list[StepOutcome]) -> Outcome:
    statuses = {outcome.status for outcome in outcomes}
    if statuses <= set(DONE_STATES):
        return "erased"
    if statuses <= {*DONE_STATES, "pending_compaction"}:
        return "erased_pending_compaction"
    return "incomplete"


async def preflight(steps: list[Step], request: Callable[[Step], StepRequest]) -> list[StepCheck]:
    """Each destructive step checked by its own region's worker, in parallel, touching nothing
    (`request` makes a step's request); a region whose worker does not answer is a transient
    problem of its steps."""

    async def check(step: Step) -> StepCheck:
        try:
            found: StepCheck = await workflow.execute_activity(
                f"{step.kind}.preflight",
                request(step),
                result_type=StepCheck,
                task_queue=task_queue(step.region, workflow.info().task_queue),
                schedule_to_close_timeout=PREFLIGHT_TIMEOUT,
                retry_policy=RetryPolicy(maximum_attempts=1),
            )
            return found
        except ActivityError as error:
            return _unanswered(step, error)

    return list(await asyncio.gather(*(check(s) for s in steps if s.action != "retain")))


async def preflight_by_region(
    steps: list[Step], request: Callable[[Step], StepRequest]
) -> list[StepCheck]:
    """Each region's destructive steps checked by that region's worker in one activity
    (`region.preflight`), the regions in parallel, touching nothing; the checks in the steps'
    order. A region whose worker does not answer is a transient problem of each of its steps."""
    destructive = [step for step in steps if step.action != "retain"]

    async def check(region: str) -> list[StepCheck]:
        mine = [step for step in destructive if step.region == region]
        try:
            found: list[StepCheck] = await workflow.execute_activity(
                "region.preflight",
                [request(step) for step in mine],
                result_type=list[StepCheck],
                task_queue=task_queue(region, workflow.info().task_queue),
                schedule_to_close_timeout=PREFLIGHT_TIMEOUT,
                retry_policy=RetryPolicy(maximum_attempts=1),
            )
            return found
        except ActivityError as error:
            return [_unanswered(step, error) for step in mine]

    regions = sorted({step.region for step in destructive})
    checks = {c.step_id: c for found in await asyncio.gather(*map(check, regions)) for c in found}
    missing = ["the region's worker returned no check of the step"]
    return [checks.get(s.id) or StepCheck(step_id=s.id, problems=missing) for s in destructive]


def _unanswered(step: Step, error: ActivityError) -> StepCheck:
    """The preflight of a step whose region's worker did not check it."""
    return StepCheck(
        step_id=step.id,
        problems=[
            f"the worker of region {step.region!r} did not check the step "
            f"({failure_reason(error)}); is `lethe worker --region {step.region}` running?"
        ],
        transient=True,
    )
