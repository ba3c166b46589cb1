"""`lethe forget-list show|replay`: re-apply every erasure to a system restored from backup."""

from __future__ import annotations

import asyncio
import json as jsonlib
from typing import Annotated

import typer
from rich.table import Table

from lethe.cli.common import ByOption, JsonOption, actor, err, out, run
from lethe.cli.views import when
from lethe.sdk.client import Client

forget_app = typer.Typer(
    help="The forget-list: erased subjects, re-applied after a restore.", no_args_is_help=True
)


@forget_app.command("show")
def show(json: JsonOption = False) -> None:
    """List erased subjects by reference (never their identifiers)."""
    run(_show(json))


async def _show(json: bool) -> int:
    client = await Client.connect()
    entries = await client.forget_list()
    if json:
        out.print_json(jsonlib.dumps([e.model_dump(mode="json") for e in entries]))
        return 0
    table = Table(title=f"forget-list ({len(entries)} subjects)", title_justify="left")
    for column in ("subject reference", "tenant", "request", "erased", "systems"):
        table.add_column(column)
    for entry in entries:
        table.add_row(
            entry.subject_ref,
            entry.tenant,
            entry.request_id,
            when(entry.erased_at),
            ", ".join(entry.systems),
        )
    out.print(table)
    return 0


@forget_app.command("replay")
def replay(
    system: Annotated[str, typer.Option(help="the system restored from backup")],
    by: ByOption = "",
    wait: Annotated[bool, typer.Option(help="wait for every replay and summarise")] = True,
) -> None:
    """Re-apply every erasure on the forget-list to a restored system, before it is used."""
    run(_replay(system, actor(by), wait))


async def _replay(system: str, by: str, wait: bool) -> int:
    client = await Client.connect()
    started = await client.replay_forget_list(system, by=by)
    err.print(f"replaying {len(started)} erasure(s) on {system}")
    if not wait or not started:
        return 0
    with err.status(f"re-applying {len(started)} erasure(s) to {system}"):
        certificates = await asyncio.gather(*(client.result(wid) for wid in started))
    table = Table(title=f"replay on {system}", title_justify="left")
    for column in ("workflow", "outcome", "steps"):
        table.add_column(column)
    for workflow_id, certificate in zip(started, certificates, strict=True):
        statuses = ", ".join(f"{o.step_id}:{o.status}" for o in certificate.steps)
        table.add_row(workflow_id, certificate.outcome, statuses)
    out.print(table)
    return 0 if all(c.outcome.startswith("erased") for c in certificates) else 1
