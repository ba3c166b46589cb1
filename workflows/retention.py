"""The retention sweep: remove what the pack's storage limits say must go, keep what its
obligations and the legal holds say must stay, and leave a ledger entry for every batch.

The sweep runs on the control queue. It plans (local activity `retention.plan`: the data map
and the pack, touching nothing), then takes the tasks in plan order. For each, it calls the
task's `<kind>.sweep` on the region's queue, batch after batch, each call given the active legal
holds read just before it (so a hold placed mid-sweep is respected from the next batch) and the
cursor the last one returned, until the task is done. A task that fails (an unreachable system,
a column that is not a date) is reported as failed and the sweep goes on. Long sweeps continue
as new with their state. A dry run (`lethe retention plan`) counts instead of removing and
writes no ledger entry; every run closes with a `SweepReport`, kept in Lethe's store.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from lethe.contracts import (
        Drift,
        Hold,
        LedgerRecord,
        SweepBatch,
        SweepPlan,
        SweepReport,
        SweepRequest,
        SweepResult,
        SweepState,
        SweepTask,
        TaskReport,
    )
    from lethe.kernel.errors import failure_reason
    from lethe.kernel.regions import task_queue
    from lethe.temporal import search_attributes as sa
    from lethe.workflows.erasure import CONTROL_RETRY, CONTROL_TIMEOUT

KIND = "retention-sweep"
DRY_RUN_KIND = "retention-plan"
SWEEP_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=2),
    maximum_attempts=0,
)
"""Transient failures retry for the request's `retry_span`; configuration errors fail the task
at once."""
SWEEP_TIMEOUT = timedelta(minutes=10)
SWEEP_HEARTBEAT = timedelta(seconds=20)
"""A batch heartbeats while it works (every third of this); a worker lost mid-batch is noticed
after this long, and the batch runs again elsewhere."""
SCHEDULED_AT = SearchAttributeKey.for_datetime("TemporalScheduledStartTime")
"""Set by a Temporal Schedule on the runs it starts: the moment the run was due."""
MAX_SAMPLES = 20


@workflow.defn
class RetentionSweepWorkflow:
    """Sweep every task of the retention plan, batch by batch, and report."""

    @workflow.init
    def __init__(self, request: SweepRequest) -> None:
        self._request = request
        self._state: SweepState | None = request.state
        self._batches_this_run = 0

    @workflow.query
    def progress(self) -> SweepReport | None:
        """The report so far (None while planning)."""
        return self._report(finished=False) if self._state else None

    @workflow.run
    async def run(self, request: SweepRequest) -> SweepReport:
        if self._state is None:
            workflow.upsert_search_attributes(
                [
                    sa.KIND.value_set(DRY_RUN_KIND if request.dry_run else KIND),
                    sa.STATUS.value_set("planning"),
                ]
            )
            plan: SweepPlan = await workflow.execute_local_activity(
                "retention.plan",
                request,
                result_type=SweepPlan,
                start_to_close_timeout=CONTROL_TIMEOUT,
                retry_policy=CONTROL_RETRY,
            )
            scheduled = workflow.info().typed_search_attributes.get(SCHEDULED_AT)
            self._state = SweepState(
                started_at=workflow.now(), as_of=scheduled or workflow.now(), plan=plan
            )
            await self._ledger(
                [self._entry("retention.started", "started", details=self._start_details())]
            )
        workflow.upsert_search_attributes([sa.STATUS.value_set("sweeping")])
        state = self._state
        for index, task in enumerate(state.plan.tasks):
            if index < len(state.reports) and state.reports[index].status != "running":
                continue
            await self._sweep(index, task)
        report = self._report(finished=True)
        await workflow.execute_local_activity(
            "retention.keep_report",
            report,
            start_to_close_timeout=CONTROL_TIMEOUT,
            retry_policy=CONTROL_RETRY,
        )
        await self._ledger([self._entry("retention.finished", "finished", self._totals(report))])
        workflow.upsert_search_attributes([sa.STATUS.value_set("completed")])
        return report

    async def _sweep(self, index: int, task: SweepTask) -> None:
        """Run one task to its end: batch after batch, each with the holds of its moment."""
        if index == len(self._current.reports):
            self._set(index, self._open(task), cursor=None)
        if task.kept is not None:
            kept = self._current.reports[index].model_copy(update={"status": "kept"})
            self._set(index, kept)
            return
        pending: list[LedgerRecord] = []
        while True:
            # One local activity between batches: the last batch's ledger entry, then the holds
            # in force for the next.
            holds: list[Hold] = await workflow.execute_local_activity(
                "retention.next_batch",
                pending,
                result_type=list[Hold],
                start_to_close_timeout=CONTROL_TIMEOUT,
                retry_policy=CONTROL_RETRY,
            )
            pending = []
            batch = SweepBatch(
                run_id=workflow.info().workflow_id,
                task=task,
                now=self._current.as_of,
                cursor=self._current.cursor,
                batch_size=self._request.batch_size,
                holds=holds,
                dry_run=self._request.dry_run,
                apply=self._request.apply,
                samples=self._request.samples,
            )
            report = self._current.reports[index]
            try:
                result: SweepResult = await workflow.execute_activity(
                    f"{task.kind}.sweep",
                    batch,
                    result_type=SweepResult,
                    task_queue=task_queue(task.region, workflow.info().task_queue),
                    activity_id=f"{task.id}#{report.batches + 1}",
                    start_to_close_timeout=SWEEP_TIMEOUT,
                    schedule_to_close_timeout=self._request.retry_span,
                    heartbeat_timeout=SWEEP_HEARTBEAT,
                    retry_policy=SWEEP_RETRY,
                )
            except ActivityError as error:
                failed = report.model_copy(
                    update={"status": "failed", "detail": failure_reason(error)}
                )
                self._set(index, failed)
                await self._ledger([self._task_entry(failed, "retention.task_failed")])
                return
            report = _add(report, result)
            self._set(index, report, cursor=result.cursor)
            self._batches_this_run += 1
            if not self._request.dry_run and (result.removed or result.held):
                pending = [self._batch_entry(task, report, result)]
            if result.done:
                done = report.model_copy(update={"status": "done"})
                self._set(index, done, cursor=None)
                await self._ledger(pending + self._drift_entries(done))
                return
            if (
                self._batches_this_run >= self._request.batches_per_run
                or workflow.info().is_continue_as_new_suggested()
            ):
                await self._ledger(pending)
                workflow.continue_as_new(self._request.model_copy(update={"state": self._current}))

    @property
    def _current(self) -> SweepState:
        assert self._state is not None, "planned before any task runs"
        return self._state

    def _set(
        self, index: int, report: TaskReport, cursor: list[str | int | float | None] | None = None
    ) -> None:
        reports = list(self._current.reports)
        if index == len(reports):
            reports.append(report)
        else:
            reports[index] = report
        self._state = self._current.model_copy(update={"reports": reports, "cursor": cursor})

    def _open(self, task: SweepTask) -> TaskReport:
        terms = ([task.limit] if task.limit else []) + task.obligations
        return TaskReport(
            task_id=task.id,
            system=task.system,
            kind=task.kind,
            rules=task.rules,
            citations={term.rule: term.citation for term in terms},
            action=task.limit.action if task.limit else None,
            status="running",
            detail=task.kept or "",
        )

    def _report(self, *, finished: bool) -> SweepReport:
        state = self._current
        return SweepReport(
            run_id=workflow.info().workflow_id,
            requested_by=self._request.requested_by,
            dry_run=self._request.dry_run,
            apply=self._request.apply,
            pack=state.plan.pack,
            started_at=state.started_at,
            as_of=state.as_of,
            finished_at=workflow.now() if finished else None,
            tasks=state.reports,
            warnings=state.plan.warnings,
        )

    # --- the ledger ---------------------------------------------------------------------------

    async def _ledger(self, entries: list[LedgerRecord]) -> None:
        if self._request.dry_run or not entries:
            return
        await workflow.execute_local_activity(
            "ledger.record",
            entries,
            result_type=list[str],
            start_to_close_timeout=CONTROL_TIMEOUT,
            retry_policy=CONTROL_RETRY,
        )

    def _entry(
        self,
        action: str,
        key: str,
        details: dict[str, str | int | float | bool | None],
        system: str | None = None,
    ) -> LedgerRecord:
        run_id = workflow.info().workflow_id
        return LedgerRecord(
            idempotency_key=f"{run_id}/{key}",
            request_id=run_id,
            subject_ref="-",
            actor=self._request.requested_by,
            action=action,
            system=system,
            details=details,
        )

    def _start_details(self) -> dict[str, str | int | float | bool | None]:
        plan = self._current.plan
        return {
            "pack": plan.pack,
            "as_of": self._current.as_of.isoformat(),
            "tasks": len(plan.tasks),
            "kept": sum(1 for task in plan.tasks if task.kept),
            "apply": self._request.apply,
            "rules": ",".join(self._request.rules) or None,
            "systems": ",".join(self._request.systems) or None,
        }

    def _batch_entry(
        self, task: SweepTask, report: TaskReport, result: SweepResult
    ) -> LedgerRecord:
        limit = task.limit
        return self._entry(
            "retention.batch",
            f"{task.id}/batch/{report.batches}",
            {
                "task": task.id,
                "rule": limit.rule if limit else None,
                "citation": limit.citation if limit else None,
                "kept_by": ",".join(term.rule for term in task.obligations) or None,
                "action": limit.action if limit else None,
                "batch": report.batches,
                "removed": result.removed,
                "held": result.held,
                "undated": result.undated,
                "from": result.first,
                "to": result.last,
            },
            system=task.system,
        )

    def _task_entry(self, report: TaskReport, action: str) -> LedgerRecord:
        return self._entry(
            action,
            f"{report.task_id}/{action}",
            {"task": report.task_id, "rules": ",".join(report.rules), "detail": report.detail},
            system=report.system,
        )

    def _drift_entries(self, report: TaskReport) -> list[LedgerRecord]:
        return [
            self._entry(
                "retention.drift_fixed" if drift.fixed else "retention.drift",
                f"{report.task_id}/drift/{n}",
                {
                    "task": report.task_id,
                    "target": drift.target,
                    "setting": drift.setting,
                    "old": drift.found,
                    "new": drift.wanted if drift.fixed else None,
                    "wanted": drift.wanted,
                    "breaks": drift.breaks,
                    "count": drift.count,
                },
                system=report.system,
            )
            for n, drift in enumerate(report.drift)
        ]

    @staticmethod
    def _totals(report: SweepReport) -> dict[str, str | int | float | bool | None]:
        return {
            "removed": report.removed,
            "held": report.held,
            "undated": sum(task.undated for task in report.tasks),
            "failed": sum(1 for task in report.tasks if task.status == "failed"),
            "drift": sum(len(task.drift) for task in report.tasks),
            "fixed": sum(1 for task in report.tasks for drift in task.drift if drift.fixed),
        }


def _add(report: TaskReport, result: SweepResult) -> TaskReport:
    """A task's totals with one more batch."""
    return report.model_copy(
        update={
            "removed": report.removed + result.removed,
            "held": report.held + result.held,
            "undated": report.undated + result.undated,
            "batches": report.batches + 1,
            "drift": _merged(report.drift, result.drift),
            "samples": (report.samples + result.samples)[:MAX_SAMPLES],
            # A batch's detail speaks of that batch; the totals are the report's columns.
            "detail": (
                result.detail
                if report.batches == 0
                else f"{report.batches + 1} batches; the last: {result.detail}"
                if result.detail
                else report.detail
            ),
        }
    )


def _merged(found: list[Drift], more: list[Drift]) -> list[Drift]:
    """Drift of several pages as one list: the same target, setting and rule summed."""
    merged = {(d.target, d.setting, d.breaks): d for d in found}
    for drift in more:
        key = (drift.target, drift.setting, drift.breaks)
        if key in merged:
            old = merged[key]
            drift = old.model_copy(
                update={"count": old.count + drift.count, "fixed": old.fixed and drift.fixed}
            )
        merged[key] = drift
    return list(merged.values())
