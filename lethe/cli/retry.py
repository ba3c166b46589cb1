"""`lethe retry`: re-run the failed steps of a closed, incomplete erasure (a face over
`Client.retry`)."""

from __future__ import annotations

from typing import Annotated

import typer

from lethe.cli.common import (
    ByOption,
    JsonOption,
    RequestArgument,
    SubjectOption,
    TenantOption,
    actor,
    err,
    out,
    request_id,
    run,
)
from lethe.cli.erasure import follow
from lethe.cli.views import when
from lethe.contracts import ErasureStatus
from lethe.sdk.client import Client


def register(app: typer.Typer) -> None:
    """Add `retry` to the `lethe` app."""
    app.command()(retry)


def retry(
    request: RequestArgument = None,
    tenant: TenantOption = None,
    subject: SubjectOption = None,
    step: Annotated[
        list[str],
        typer.Option("--step", help="a failed step to retry (repeatable); default: every one"),
    ] = [],  # noqa: B006 - typer reads the default, never mutates it
    by: ByOption = "",
    wait: Annotated[bool, typer.Option(help="show progress until a person or time is next")] = True,
    json: JsonOption = False,
) -> None:
    """Re-run the failed steps of a closed, incomplete erasure, under its original approval."""
    run(_retry(request, tenant, subject, step, actor(by), wait, json))


async def _retry(
    request: str | None,
    tenant: str | None,
    subject: str | None,
    steps: list[str],
    by: str,
    wait: bool,
    json: bool,
) -> int:
    client = await Client.connect()
    workflow_id = request_id(client, request, tenant, subject)
    started = await client.retry(workflow_id, steps or None, by=by)
    approval = (
        f"the original approval (by {started.approved_by}) stands"
        if started.approved_by
        else "the original request needed no approval"
    )
    err.print(
        f"retrying {', '.join(started.steps)} of {started.retry_of} as {started.request_id} "
        f"({workflow_id}); {approval}"
    )
    current = await follow(client, workflow_id) if wait else None
    if json:
        data: dict[str, object] = {
            "request": workflow_id,
            "request_id": started.request_id,
            "retry_of": started.retry_of,
            "steps": started.steps,
        }
        if started.approved_by:
            data["approved_by"] = started.approved_by
        if current is not None:
            data["status"] = current.model_dump(mode="json")
        out.print_json(data=data)
    if current is not None:
        _next(workflow_id, current)
    return 0


def _next(workflow_id: str, current: ErasureStatus) -> None:
    if current.state == "completed":
        err.print(f"completed: `lethe certificate {workflow_id}`")
    elif current.state == "preflight_failed":
        err.print(
            "the preflight found problems, so nothing has been destroyed: fix them, then "
            f"`lethe recheck {workflow_id}`"
        )
    elif current.state == "waiting_window":
        err.print(f"backups and logs follow by {when(current.window_ends_at)}")
    else:
        err.print(f"{current.state}: `lethe status {workflow_id}`")
