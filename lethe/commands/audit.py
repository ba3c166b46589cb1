"""`lethe audit`: verify the ledger, read a request's decrypted history, list requests."""

from __future__ import annotations

import json as jsonlib
from datetime import datetime
from typing import Annotated, get_args

import typer
from rich.table import Table

from lethe import audit, ledger
from lethe import search_attributes as sa
from lethe.client import Client
from lethe.commands.common import JsonOption, err, out, run
from lethe.commands.views import when
from lethe.contracts import ErasureState, RequestSummary
from lethe.store import engine_for

audit_app = typer.Typer(help="For auditors: the ledger, histories, requests.", no_args_is_help=True)


@audit_app.command("verify")
def verify() -> None:
    """Check the ledger's hash chain: any altered, removed or reordered entry is reported."""
    run(_verify())


async def _verify() -> int:
    client = await Client.connect()
    report = await ledger.verify_chain(
        await engine_for(client.settings.store_url.get_secret_value())
    )
    if report.intact:
        out.print(f"ledger intact: {report.entries} entries, every hash and link checks out")
        return 0
    for problem in report.problems:
        err.print(f"[red]broken:[/red] {problem}")
    return 1


@audit_app.command("history")
def history(
    workflow_id: Annotated[str, typer.Argument(help="the workflow id, e.g. erasure-<reference>")],
    json: JsonOption = False,
) -> None:
    """Show a workflow's history, payloads decrypted through the codec, as a timeline."""
    run(_history(workflow_id, json))


async def _history(workflow_id: str, json: bool) -> int:
    client = await Client.connect()
    events = await audit.timeline(client.temporal, workflow_id)
    if json:
        out.print_json(jsonlib.dumps([e.model_dump(mode="json") for e in events]))
        return 0
    table = Table(title=f"history of {workflow_id}", title_justify="left")
    for column in ("#", "at", "event", "detail", "payloads"):
        table.add_column(column)
    for event in events:
        shown = jsonlib.dumps(event.payloads, default=str)
        table.add_row(str(event.id), when(event.at), event.type, event.detail, shown[:200])
    out.print(table)
    return 0


@audit_app.command("list")
def list_requests(
    region: Annotated[str | None, typer.Option(help="only requests touching this region")] = None,
    status: Annotated[
        str | None, typer.Option(help=f"one of: {', '.join(get_args(ErasureState))}")
    ] = None,
    since: Annotated[
        datetime | None, typer.Option(help="started on or after (ISO date)", formats=["%Y-%m-%d"])
    ] = None,
    json: JsonOption = False,
) -> None:
    """List erasure requests by region, status and date (through search attributes)."""
    if status is not None and status not in get_args(ErasureState):
        raise typer.BadParameter(f"status must be one of {', '.join(get_args(ErasureState))}")
    run(_list(region, status, since, json))


async def _list(region: str | None, status: str | None, since: datetime | None, json: bool) -> int:
    client = await Client.connect()
    query = audit.list_query(region=region, state=status, since=since)  # type: ignore[arg-type]
    rows = [
        RequestSummary(
            request=execution.id,
            status=execution.typed_search_attributes.get(sa.STATUS),
            regions=list(execution.typed_search_attributes.get(sa.REGIONS) or []),
            started=execution.start_time,
            closed=execution.close_time,
        )
        async for execution in client.temporal.list_workflows(query)
    ]
    if json:
        out.print_json(jsonlib.dumps([row.model_dump(mode="json") for row in rows]))
        return 0
    table = Table(title="erasure requests", title_justify="left")
    for column in ("request", "status", "regions", "started", "closed"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row.request,
            row.status or "-",
            ",".join(row.regions),
            when(row.started),
            when(row.closed),
        )
    out.print(table)
    return 0
