"""`lethe keys rotate|status`, `lethe schedule key-rotation`: KEK rotation, now or on a timetable.

A rotation is the workflow `key-rotation` on the control queue: starting one while another runs
joins it (the one the schedule started too). Progress comes from the workflow's `progress`
query, which only a running control worker answers.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Annotated

import typer
from rich.console import Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from temporalio.client import Client as TemporalClient

from lethe.cli.common import ByOption, JsonOption, actor, err, out, run, valid
from lethe.cli.views import when
from lethe.kernel import deadlines
from lethe.kernel.config import load_settings
from lethe.kernel.deadlines import format_duration
from lethe.keys.kek import KekVersion
from lethe.keys.rotation import (
    RotationProgress,
    RotationRequest,
)
from lethe.sdk.rotation import (
    QUERY_TIMEOUT,
    KeysReport,
    keys_report,
    rotation_ended,
    rotation_progress,
    schedule_rotation,
    start_rotation,
)
from lethe.temporal.connection import connect

POLL_SECONDS = 1.0
MIN_EVERY = timedelta(hours=1)
VERSION_STYLE = {"current": "green", "active": "cyan", "disabled": "yellow", "retired": "dim"}

keys_app = typer.Typer(
    help="The key service: rotate the key-encryption key, show the keys' state.",
    no_args_is_help=True,
)
schedule_app = typer.Typer(
    help="Temporal Schedules: key rotation on a timetable.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    """Add `lethe keys ...` and `lethe schedule ...` to the `lethe` app."""
    app.add_typer(keys_app, name="keys")
    app.add_typer(schedule_app, name="schedule")


# --- durations ----------------------------------------------------------------------------------


def parse_duration(text: str | timedelta) -> timedelta:
    """`90d`, `12h`, `30m`, `45s`, `2w`, or several together (`1d12h`), in either case;
    BadParameter otherwise."""
    if isinstance(text, timedelta):  # an option's default, which typer parses too
        return text
    try:
        return deadlines.parse_duration(text.lower())
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


GraceOption = Annotated[
    timedelta,
    typer.Option(
        parser=parse_duration,
        metavar="DURATION",
        help="how long old KEK versions stay disabled before they are destroyed, e.g. 7d",
    ),
]
BatchOption = Annotated[
    int, typer.Option("--batch-size", min=1, max=10_000, help="data keys per transaction")
]


async def follow(temporal: TemporalClient, workflow_id: str) -> RotationProgress:
    """Show the rotation's progress until it is in its grace period or done; the last answer."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task("starting", total=None)
        while True:
            current = await rotation_progress(temporal, workflow_id)
            target = f"KEK v{current.target}: " if current.target else ""
            bar.update(
                task,
                description=f"{target}{current.phase}",
                total=max(current.to_rewrap, current.rewrapped) or None,
                completed=current.rewrapped,
            )
            if current.phase in ("grace", "done"):
                return current
            if await rotation_ended(temporal, workflow_id):
                return await rotation_progress(temporal, workflow_id)
            await asyncio.sleep(POLL_SECONDS)


# --- lethe keys ---------------------------------------------------------------------------------


@keys_app.command("rotate")
def rotate(
    batch_size: BatchOption = 1000,
    grace: GraceOption = timedelta(days=7),
    wait: Annotated[
        bool, typer.Option("--wait", help="show progress until the grace period or the end")
    ] = False,
    by: ByOption = "",
) -> None:
    """Rotate the key-encryption key: new version, rewrap every data key, retire the old one."""
    request = valid(
        lambda: RotationRequest(batch_size=batch_size, grace=grace, requested_by=actor(by))
    )
    run(_rotate(request, wait))


async def _rotate(request: RotationRequest, wait: bool) -> int:
    settings = load_settings()
    temporal = await connect(settings)
    handle, joined = await start_rotation(temporal, settings.control_queue, request)
    workflow_id = handle.id
    if joined:
        err.print(
            f"joined the running key rotation {workflow_id} (its own batch size and grace "
            "period apply)",
            highlight=False,
        )
    else:
        err.print(f"started key rotation {workflow_id}", highlight=False)
    if not wait:
        err.print("`lethe keys status` shows its progress", highlight=False)
        return 0
    current = await follow(temporal, workflow_id)
    old = ", ".join(f"v{v}" for v in current.old_versions) or "none"
    if current.phase == "grace":
        err.print(
            f"every data key is wrapped by KEK v{current.target}; the old versions ({old}) are "
            f"disabled and will be destroyed at {when(current.grace_ends_at)}",
            highlight=False,
        )
    else:
        err.print(f"done: KEK v{current.target} is current, retired {old}", highlight=False)
    return 0


@keys_app.command("status")
def status(json: JsonOption = False) -> None:
    """KEK versions and their state, data keys per version, shredded subjects, the rotation."""
    run(_status(json))


async def _status(json: bool) -> int:
    settings = load_settings()
    with err.status(
        "reading the key service, and the rotation's progress if one runs (a control worker "
        f"answers; waiting up to {QUERY_TIMEOUT.total_seconds():g}s)"
    ):
        report = await keys_report(await connect(settings), settings)
    if json:
        out.print_json(report.model_dump_json())
    else:
        out.print(_status_view(report))
    return 0


def _status_view(report: KeysReport) -> Group:
    keys = report.keys
    versions = Table(title="key-encryption keys", title_justify="left")
    for column in ("version", "state", "data keys", "created", "retired"):
        versions.add_column(column)
    for version in keys.versions:
        versions.add_row(*_version_row(version, keys.data_keys_by_kek.get(version.version, 0)))
    versions.caption = (
        f"minimum decryption version {keys.min_decrypt_version}; "
        f"{keys.shredded_subjects} subject(s) crypto-shredded"
    )
    versions.caption_justify = "left"
    rotation: Table | str
    if report.rotation is None:
        rotation = f"rotation: {report.rotation_note}"
    else:
        current = report.rotation
        rotation = Table(title=f"rotation {current.workflow_id}", show_header=False)
        rows = [
            ("phase", current.phase),
            ("target", f"v{current.target}" if current.target else "-"),
            ("old versions", ", ".join(f"v{v}" for v in current.old_versions) or "-"),
            ("rewrapped", f"{current.rewrapped} of about {current.to_rewrap}"),
            ("passes", str(current.passes)),
            ("started", when(current.started_at)),
            ("grace ends", when(current.grace_ends_at)),
        ]
        for name, value in rows:
            rotation.add_row(name, value)
    return Group(versions, rotation)


def _version_row(version: KekVersion, data_keys: int) -> list[str]:
    style = VERSION_STYLE.get(version.state, "")
    return [
        f"v{version.version}",
        f"[{style}]{version.state}[/{style}]" if style else version.state,
        str(data_keys),
        when(version.created_at),
        when(version.retired_at),
    ]


# --- lethe schedule -----------------------------------------------------------------------------


@schedule_app.command("key-rotation")
def key_rotation(
    every: Annotated[
        timedelta,
        typer.Option(
            parser=parse_duration, metavar="DURATION", help="how often to rotate, e.g. 90d"
        ),
    ],
    grace: GraceOption = timedelta(days=7),
    batch_size: BatchOption = 1000,
    by: ByOption = "",
) -> None:
    """Create or update the Schedule that rotates the key-encryption key every DURATION."""
    if every < MIN_EVERY:
        raise typer.BadParameter(
            f"rotate at most every {format_duration(MIN_EVERY)}", param_hint="--every"
        )
    if every <= grace:
        raise typer.BadParameter(
            f"must be longer than --grace ({format_duration(grace)}): each rotation would "
            "still be in its grace period when the next is due, and the schedule would skip it",
            param_hint="--every",
        )
    request = valid(
        lambda: RotationRequest(batch_size=batch_size, grace=grace, requested_by=actor(by))
    )
    run(_schedule(every, request))


async def _schedule(every: timedelta, request: RotationRequest) -> int:
    settings = load_settings()
    temporal = await connect(settings)
    schedule_id, created, upcoming = await schedule_rotation(
        temporal, settings.control_queue, every, request
    )
    verb = "created" if created else "updated"
    err.print(
        f"{verb} schedule {schedule_id}: a key rotation every {format_duration(every)} on "
        f"{settings.control_queue} (grace {format_duration(request.grace)}; "
        "skipped while one runs)",
        highlight=False,
    )
    for moment in upcoming[:3]:
        out.print(f"next run {when(moment)}", highlight=False)
    return 0
