"""The right-to-erasure workflow: plan, approve, respect holds, erase by region, verify, certify.

Workflow id `erasure-<subject reference>`, so a second request for the same subject joins the
running one. It runs on the control queue (and so do its planning, hold, ledger and certificate
activities); each region's steps run in a child workflow on that region's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from lethe import search_attributes as sa
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
        Step,
        StepOutcome,
        StepProgress,
    )
    from lethe.deadlines import add_months
    from lethe.regions import task_queue
    from workflows.regional_erasure import RegionalErasureWorkflow

CONTROL_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=20,
)
CONTROL_TIMEOUT = timedelta(seconds=60)
HOLD_RECHECK = timedelta(hours=1)
"""Held steps are re-checked this often even if no `holds_changed` signal arrives."""

DONE_STATES = ("done", "retained")
SHRED_EVIDENCE_IN_LEDGER = "shred-evidence-in-ledger"
"""Patch: a shred step's ledger entry carries its evidence (the certificate always did)."""


@workflow.defn
class ErasureWorkflow:
    """Erase one subject everywhere the data map says their data lives."""

    def __init__(self) -> None:
        self._status: ErasureStatus | None = None
        self._approval: ApprovalDecision | None = None
        self._rejection: ApprovalDecision | None = None
        self._holds_changed = False
        self._outcomes: dict[str, StepOutcome] = {}
        self._ledger_hashes: list[str] = []
        self._extension_recorded = False

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
        if status is None or status.extension is not None:
            return
        self._set(
            extension=extension,
            deadline=add_months(status.deadline, extension.months),
            overdue=False,
        )

    @workflow.signal
    def holds_changed(self) -> None:
        """A hold was released (or placed): re-check held steps now."""
        self._holds_changed = True

    @workflow.query
    def status(self) -> ErasureStatus:
        """Where the request stands, step by step."""
        if self._status is None:
            raise RuntimeError("the workflow has not started yet")
        return self._status

    # --- the process ----------------------------------------------------------------------

    @workflow.run
    async def run(self, start: ErasureStart) -> Certificate:
        request = start.request
        self._status = ErasureStatus(
            request_id=start.request_id,
            subject_ref=start.subject_ref,
            state="planning",
            received_at=start.received_at,
            deadline=add_months(start.received_at, 1),
        )
        plan = await workflow.execute_local_activity(
            "planning.plan",
            args=[request, start.request_id, start.subject_ref],
            result_type=Plan,
            start_to_close_timeout=CONTROL_TIMEOUT,
            retry_policy=CONTROL_RETRY,
        )
        deadline = add_months(start.received_at, plan.deadline_months)
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
        if request.dry_run:
            return await self._finish(start, plan, "dry_run", "dry_run", None)

        entries = [
            self._entry(
                start, "erasure.requested", {"policy": plan.policy, "by": request.requested_by}
            )
        ]
        if request.replay_of is not None:
            # Re-applying an approved erasure to a restored system: at once, no new approval.
            entries.append(self._entry(start, "erasure.replayed", {"replay_of": request.replay_of}))
        elif plan.approval_required:
            await self._record(*entries)
            decision = await self._decision(start)
            approved = self._approval is not None
            entries = [
                self._entry(
                    start,
                    "erasure.approved" if approved else "erasure.rejected",
                    {"by": decision.by},
                )
            ]
            if not approved:
                return await self._finish(start, plan, "rejected", "rejected", None, entries)

        started_at = workflow.now()
        window_ends_at = started_at + timedelta(days=plan.window_days)
        # A replay restores an erasure already made: nothing to wait for, so its backups and
        # logs go at once; Kafka's removal is still judged against a full window.
        replay = request.replay_of is not None
        self._set(window_ends_at=window_ends_at)
        await self._record(
            *entries,
            self._entry(start, "erasure.started", {"window_days": plan.window_days}),
        )

        window = (started_at, window_ends_at)
        await self._run_steps(start, _in_phase(plan, "immediate"), window, "immediate")

        if _in_phase(plan, "deferred"):
            self._set_state("waiting_window")
            if not replay:
                await workflow.sleep(max(window_ends_at - workflow.now(), timedelta(0)))
            await self._run_steps(start, _in_phase(plan, "deferred"), window, "deferred")

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
            await self._run_steps(start, pending, window, "recheck")

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
            await self._record(self._entry(start, "erasure.extended", details))

    def _decided_or_moved(self, deadline: datetime) -> bool:
        """The DPO has decided, or the deadline moved (an extension)."""
        decided = self._approval is not None or self._rejection is not None
        return decided or self.status().deadline != deadline

    async def _run_steps(
        self,
        start: ErasureStart,
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
            if ready:
                self._set_state("erasing")
                await self._dispatch(start, ready, window, f"{label}-{round_no}")
            remaining = [step for step in remaining if step.id in held]
            if remaining:
                self._set_state("on_hold")
                self._holds_changed = False
                with contextlib.suppress(TimeoutError):
                    await workflow.wait_condition(lambda: self._holds_changed, timeout=HOLD_RECHECK)
            round_no += 1

    async def _dispatch(
        self,
        start: ErasureStart,
        steps: list[Step],
        window: tuple[datetime, datetime],
        label: str,
    ) -> None:
        regions = sorted({step.region for step in steps})
        for step in steps:
            self._update_step(step.id, status="running", holds=[])
        info = workflow.info()
        children = [f"{info.workflow_id}-{region}-{info.run_id[:8]}-{label}" for region in regions]
        self._set(children=children)
        jobs = [
            workflow.execute_child_workflow(
                RegionalErasureWorkflow.run,
                RegionJob(
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
                ),
                id=child_id,
                task_queue=task_queue(region),
            )
            for region, child_id in zip(regions, children, strict=True)
        ]
        entries = []
        for outcomes in await asyncio.gather(*jobs):
            for outcome in outcomes:
                self._outcomes[outcome.step_id] = outcome
                self._update_step(outcome.step_id, status=outcome.status, detail=outcome.detail)
                step = next(s for s in steps if s.id == outcome.step_id)
                details: dict[str, str | int | float | bool | None] = {
                    "step": step.id,
                    "action": step.action,
                    "affected": outcome.affected,
                    "verified": outcome.verified,
                }
                if step.action == "shred" and workflow.patched(SHRED_EVIDENCE_IN_LEDGER):
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
        self._set(children=[])
        await self._record(*entries)

    async def _finish(
        self,
        start: ErasureStart,
        plan: Plan,
        state: ErasureState,
        outcome: Outcome,
        started_at: datetime | None,
        closing: list[LedgerRecord] | None = None,
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
    ) -> LedgerRecord:
        """A ledger entry of this request; `key` (default: the action) makes retries harmless."""
        return LedgerRecord(
            idempotency_key=f"{start.request_id}/{key or action}",
            request_id=start.request_id,
            subject_ref=start.subject_ref,
            actor=start.request.requested_by,
            action=action,
            system=system,
            details=details,
        )

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

    def _update_step(self, step_id: str, **changes: object) -> None:
        steps = [
            step.model_copy(update=changes) if step.step_id == step_id else step
            for step in self.status().steps
        ]
        self._set(steps=steps)


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
