"""Control-plane activities of a retention sweep: its plan, the active holds, its report."""

from __future__ import annotations

from temporalio import activity

from lethe.activities.planning import planner_from_settings
from lethe.contracts import Hold, LedgerRecord, SweepPlan, SweepReport, SweepRequest
from lethe.evidence import holds, ledger, sweep_reports
from lethe.evidence.store import engine_for
from lethe.kernel.config import current_settings
from lethe.kernel.errors import LetheError
from lethe.plans.retention import plan_sweep


@activity.defn(name="retention.plan")
async def plan(request: SweepRequest) -> SweepPlan:
    """The sweep's tasks from the configured data map and pack; a conflict the pack cannot
    decide, or a filter naming nothing, fails without retrying."""
    try:
        planner = planner_from_settings()
        return plan_sweep(
            planner.datamap, planner.pack, rules=request.rules, systems=request.systems
        )
    except LetheError as exc:
        raise exc.to_application_error() from None


@activity.defn(name="retention.next_batch")
async def next_batch(entries: list[LedgerRecord]) -> list[Hold]:
    """Between two batches of a sweep: append the last one's ledger entries (each once, whatever
    the retries), then every legal hold in force, for the next."""
    store = await engine_for(current_settings().store_url.get_secret_value())
    try:
        await ledger.append_many(store, entries)
    except LetheError as exc:
        raise exc.to_application_error() from None
    return await holds.list_holds(store)


@activity.defn(name="retention.keep_report")
async def keep_report(report: SweepReport) -> None:
    """Keep a sweep's report (once, whatever the retries)."""
    await sweep_reports.keep(
        await engine_for(current_settings().store_url.get_secret_value()), report
    )
