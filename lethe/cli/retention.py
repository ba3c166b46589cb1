"""`lethe retention plan|run|status|report` and `lethe schedule retention`: retention sweeps.

`plan` is a dry run (the same workflow, counting instead of removing, touching nothing);
`run` removes what is past its storage limit and outside every obligation and hold, and with
`--apply` also changes Kafka topics' and Redis keys' expiry settings that drift from the rules.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

import typer
from rich.console import Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from temporalio.client import Client as TemporalClient

from lethe.cli.common import ByOption, JsonOption, actor, err, out, run, valid
from lethe.cli.keys import parse_duration, schedule_app
from lethe.cli.views import when
from lethe.contracts import SWEEP_BATCH, SweepReport, SweepRequest
from lethe.kernel.config import load_settings
from lethe.kernel.deadlines import format_duration
from lethe.sdk import retention as sweeps
from lethe.temporal.connection import connect

MIN_EVERY = timedelta(hours=1)

retention_app = typer.Typer(
    help="Retention sweeps: remove what is past its storage limit, keep what obligations and "
    "legal holds keep, and report both.",
    no_args_is_help=True,
)

RuleOption = Annotated[
    list[str] | None,
    typer.Option("--rule", help="only tasks this retention rule decides (repeatable)"),
]
SystemOption = Annotated[
    list[str] | None, typer.Option("--system", help="only this system (repeatable)")
]
BatchOption = Annotated[
    int, typer.Option("--batch-size", min=1, max=100_000, help="records per batch")
]
ApplyOption = Annotated[
    bool,
    typer.Option(
        "--apply", help="also change Kafka topic configs and Redis TTLs that break a rule"
    ),
]


def register(app: typer.Typer) -> None:
    """Add `lethe retention ...` (and `lethe schedule retention`) to the `lethe` app."""
    app.add_typer(retention_app, name="retention")


# --- views ------------------------------------------------------------------------------------


def report_view(report: SweepReport) -> Group:
    """A sweep's report: a row per task that ran, then what each found, the tasks kept whole
    and why, and the warnings."""
    verb = "would remove" if report.dry_run else "removed"
    table = Table(
        title=(
            f"{'dry run' if report.dry_run else 'sweep'} {report.run_id} under {report.pack}, "
            f"as of {when(report.as_of)}" + ("" if report.finished_at else " (running)")
        ),
        title_justify="left",
    )
    # Short values only, so the table reads at 80 columns; the rules go on the lines below.
    table.add_column("task", no_wrap=True)
    for column in ("status", "action", verb, "held", "undated"):
        table.add_column(column, overflow="fold")
    ran = [task for task in report.tasks if task.status != "kept"]
    for task in ran:
        table.add_row(
            task.task_id,
            task.status,
            task.action or "-",
            str(task.removed),
            str(task.held),
            str(task.undated),
        )
    lines: list[str] = []
    for task in ran:
        notes = [f"rules {', '.join(task.rules)}"] if task.rules else []
        notes += [task.detail] if task.detail else []
        notes += [
            f"{d.target} {d.setting} {d.found} -> {d.wanted}"
            + (" (fixed)" if d.fixed else "")
            + (f" on {d.count} keys" if d.count > 1 else "")
            + f": {d.breaks}"
            for d in task.drift
        ]
        if task.samples:
            notes.append("e.g. " + ", ".join(task.samples))
        lines += [f"{task.task_id}: {note}" for note in notes]
    lines += [
        f"kept {task.task_id}: {task.detail}" for task in report.tasks if task.status == "kept"
    ]
    lines += [f"warning: {warning}" for warning in report.warnings]
    lines.append(
        f"{verb} {report.removed}; kept for legal holds {report.held}; "
        f"{sum(1 for t in report.tasks if t.status == 'failed')} task(s) failed"
    )
    return Group(table, *lines)


def _print(report: SweepReport, json: bool) -> int:
    if json:
        out.print_json(report.model_dump_json())
    else:
        out.print(report_view(report))
    return 1 if any(task.status == "failed" for task in report.tasks) else 0


async def _follow(temporal: TemporalClient, run_id: str) -> SweepReport:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task("planning", total=None)

        def show(progress: SweepReport) -> None:
            closed = sum(1 for t in progress.tasks if t.status != "running")
            current = next((t.task_id for t in progress.tasks if t.status == "running"), "")
            bar.update(
                task,
                description=f"{current or 'tasks'}: {progress.removed} removed",
                total=max(len(progress.tasks), 1),
                completed=closed,
            )

        return await sweeps.follow(temporal, run_id, show)


# --- lethe retention --------------------------------------------------------------------------


@retention_app.command("plan")
def plan(
    rule: RuleOption = None,
    system: SystemOption = None,
    batch_size: BatchOption = SWEEP_BATCH,
    samples: Annotated[int, typer.Option(min=0, max=20, help="row keys shown per task")] = 3,
    json: JsonOption = False,
    by: ByOption = "",
) -> None:
    """What a sweep would remove, per rule and system, with counts: a dry run, touching nothing."""
    request = valid(
        lambda: SweepRequest(
            requested_by=actor(by),
            dry_run=True,
            rules=rule or [],
            systems=system or [],
            batch_size=batch_size,
            samples=samples,
        )
    )
    run(_start(request, wait=True, json=json))


@retention_app.command("run")
def run_sweep(
    rule: RuleOption = None,
    system: SystemOption = None,
    apply: ApplyOption = False,
    wait: Annotated[bool, typer.Option("--wait", help="show progress until the report")] = False,
    batch_size: BatchOption = SWEEP_BATCH,
    json: JsonOption = False,
    by: ByOption = "",
) -> None:
    """Start a sweep: remove what is past its storage limit (and, --apply, fix drift)."""
    request = valid(
        lambda: SweepRequest(
            requested_by=actor(by),
            apply=apply,
            rules=rule or [],
            systems=system or [],
            batch_size=batch_size,
        )
    )
    run(_start(request, wait=wait, json=json))


async def _start(request: SweepRequest, *, wait: bool, json: bool) -> int:
    settings = load_settings()
    temporal = await connect(settings)
    run_id = await sweeps.start_sweep(temporal, settings, request)
    err.print(f"started {run_id}", highlight=False)
    if not wait:
        err.print(
            f"`lethe retention status` shows its progress; `lethe retention report {run_id}` "
            "its report",
            highlight=False,
        )
        return 0
    return _print(await _follow(temporal, run_id), json)


@retention_app.command("status")
def status(json: JsonOption = False) -> None:
    """The running sweep's progress, and the latest sweeps."""
    run(_status(json))


async def _status(json: bool) -> int:
    settings = load_settings()
    temporal = await connect(settings)
    running_id = await sweeps.running_sweep(temporal, settings.control_queue)
    running = await sweeps.sweep_progress(temporal, running_id) if running_id else None
    recent = await sweeps.recent(settings, limit=10)
    ended = await sweeps.ended_without_report(temporal, settings.control_queue)
    if json:
        body = {
            "running": running.model_dump(mode="json") if running else None,
            "recent": [r.model_dump(mode="json") for r in recent],
            "ended_without_report": [e.model_dump(mode="json") for e in ended],
        }
        out.print_json(data=body)
        return 0
    if running is not None:
        out.print(report_view(running))
    elif running_id:
        out.print(f"{running_id} is planning", highlight=False)
    else:
        out.print("no sweep is running", highlight=False)
    table = Table(title="latest sweeps", title_justify="left")
    for column in ("run", "by", "started", "finished", "removed", "held", "failed tasks"):
        table.add_column(column)
    for report in recent:
        table.add_row(
            report.run_id + (" (dry run)" if report.dry_run else ""),
            report.requested_by,
            when(report.started_at),
            when(report.finished_at),
            str(report.removed),
            str(report.held),
            str(sum(1 for t in report.tasks if t.status == "failed")),
        )
    out.print(table)
    for sweep in ended:
        out.print(
            f"{sweep.run_id} ({when(sweep.started_at)}) {sweep.status} without a report: "
            f"{sweep.reason or 'no reason recorded'}",
            highlight=False,
        )
    return 0


@retention_app.command("report")
def report(
    run_id: Annotated[str, typer.Argument(help="the sweep's run id (retention-...)")],
    json: JsonOption = False,
) -> None:
    """A sweep's report: per task, what it removed, kept for holds, and the drift it found."""
    run(_report(run_id, json))


async def _report(run_id: str, json: bool) -> int:
    settings = load_settings()
    temporal = await connect(settings)
    return _print(await sweeps.report(temporal, settings, run_id), json)


# --- lethe schedule retention -----------------------------------------------------------------


@schedule_app.command("retention")
def schedule(
    every: Annotated[
        timedelta,
        typer.Option(parser=parse_duration, metavar="DURATION", help="how often, e.g. 1d"),
    ],
    apply: ApplyOption = False,
    catchup: Annotated[
        timedelta,
        typer.Option(
            parser=parse_duration,
            metavar="DURATION",
            help="how late a missed sweep may still start (after an outage)",
        ),
    ] = sweeps.DEFAULT_CATCHUP,
    batch_size: BatchOption = SWEEP_BATCH,
    by: ByOption = "",
) -> None:
    """Create or update the Schedule running a retention sweep every DURATION (skipped while
    the last one runs)."""
    if every < MIN_EVERY:
        raise typer.BadParameter(
            f"sweep at most every {format_duration(MIN_EVERY)}", param_hint="--every"
        )
    request = valid(
        lambda: SweepRequest(requested_by=actor(by), apply=apply, batch_size=batch_size)
    )
    run(_schedule(every, catchup, request))


async def _schedule(every: timedelta, catchup: timedelta, request: SweepRequest) -> int:
    settings = load_settings()
    temporal = await connect(settings)
    schedule_id, created, upcoming = await sweeps.schedule_sweeps(
        temporal, settings, every, request, catchup
    )
    err.print(
        f"{'created' if created else 'updated'} schedule {schedule_id}: a retention sweep every "
        f"{format_duration(every)} on {settings.control_queue} (skipped while one runs; a missed "
        f"one starts up to {format_duration(catchup)} late"
        + ("; fixes drift" if request.apply else "")
        + ")",
        highlight=False,
    )
    for moment in upcoming[:3]:
        out.print(f"next run {when(moment)}", highlight=False)
    return 0
