"""`lethe audit`: verify the ledger, read a request's decrypted history, list requests."""

from __future__ import annotations

import json as jsonlib
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, get_args

import typer
from rich.markup import escape
from rich.table import Table

from lethe.cli.common import ByOption, JsonOption, actor, err, out, run
from lethe.cli.views import when
from lethe.contracts import ErasureState, LedgerEntry, RequestSummary, TimelineEvent
from lethe.evidence import audit, bulk, ledger
from lethe.evidence.store import engine_for
from lethe.kernel import database
from lethe.kernel.config import load_settings
from lethe.sdk import requests
from lethe.sdk.client import Client
from lethe.temporal import history as history_lib

audit_app = typer.Typer(help="For auditors: the ledger, histories, requests.", no_args_is_help=True)


@audit_app.command("verify")
def verify() -> None:
    """Check the ledger's hash chain (any altered, removed or reordered entry is reported) and
    every bulk batch's Merkle root (recomputed from its leaves, against its ledger entry)."""
    run(_verify())


async def _verify() -> int:
    engine = await engine_for(load_settings().store_url.get_secret_value())
    try:
        chain = await ledger.verify_chain(engine)
        batches = await bulk.bulk_report(engine)
    finally:
        await database.dispose(engine)
    if chain.intact:
        out.print(f"ledger intact: {chain.entries} entries, every hash and link checks out")
    _broken(chain.problems)
    counted = f"{batches.batches} bulk batches, {batches.leaves} leaves"
    if batches.problems:
        err.print(f"bulk batches checked: {counted}")
    else:
        out.print(f"bulk batches intact: {counted}, every Merkle root checks out")
    _broken(batches.problems)
    return 0 if chain.intact and not batches.problems else 1


def _broken(problems: list[str]) -> None:
    for problem in problems:
        err.print(f"[red]broken:[/red] {escape(problem)}", highlight=False)


MAX_REASON_CHARS = 500


@dataclass(frozen=True)
class Reveal:
    """Who asked to see the identifiers in clear, and why."""

    by: str
    reason: str


@audit_app.command("history")
def history(
    workflow_id: Annotated[str, typer.Argument(help="the workflow id, e.g. erasure-<reference>")],
    json: JsonOption = False,
    reveal: Annotated[
        bool,
        typer.Option(
            "--reveal",
            help="show the subject's id and identities in clear (needs --reason; recorded in "
            "the ledger with who asked and why)",
        ),
    ] = False,
    reason: Annotated[
        str, typer.Option("--reason", help="with --reveal: why the identifiers are needed")
    ] = "",
    by: ByOption = "",
) -> None:
    """Show a workflow's history, payloads decrypted through the codec, as a timeline.

    The subject's id and identity values are replaced by markers (subject id, identity email),
    in the table and in --json alike, unless --reveal is given.
    """
    if (reason or by) and not reveal:
        raise typer.BadParameter("--reason and --by go with --reveal")
    if reveal and not reason.strip():
        raise typer.BadParameter("--reveal needs --reason: why the identifiers are needed")
    if len(reason) > MAX_REASON_CHARS:
        raise typer.BadParameter(f"--reason is at most {MAX_REASON_CHARS} characters")
    run(_history(workflow_id, json, Reveal(actor(by), reason.strip()) if reveal else None))


async def _history(workflow_id: str, json: bool, reveal: Reveal | None) -> int:
    client = await Client.connect()
    events = await audit.timeline(client.temporal, workflow_id)
    markers = history_lib.subject_markers(p for e in events for p in e.payloads)
    if reveal is None:
        events = [
            e.model_copy(update={"payloads": history_lib.redact(e.payloads, markers)})
            for e in events
        ]
    else:
        # Recorded before anything is shown: no record, no identifiers.
        entry = await _record_reveal(client, workflow_id, events, markers, reveal)
        err.print(
            "showing the subject's identifiers in clear; recorded in the ledger "
            f"(entry {entry.seq}, by {escape(entry.actor)})",
            highlight=False,
        )
    if json:
        out.print_json(jsonlib.dumps([e.model_dump(mode="json") for e in events]))
        return 0
    table = Table(title=f"history of {workflow_id}", title_justify="left")
    for column in ("#", "at", "event", "detail", "payloads"):
        table.add_column(column)
    for event in events:
        shown = jsonlib.dumps(event.payloads, default=str)
        table.add_row(
            str(event.id), when(event.at), event.type, escape(event.detail), escape(shown[:200])
        )
    out.print(table)
    return 0


async def _record_reveal(
    client: Client,
    workflow_id: str,
    events: list[TimelineEvent],
    markers: dict[str, str],
    reveal: Reveal,
) -> LedgerEntry:
    """The ledger entry of a reveal: the request id and subject reference, never the
    identifiers (the reason is redacted too, in case it quotes them)."""
    request_id, subject_ref = history_lib.request_of(p for e in events for p in e.payloads) or (
        workflow_id,
        "-",
    )
    return await ledger.append(
        await engine_for(client.settings.store_url.get_secret_value()),
        idempotency_key=f"{request_id}/history.revealed/{uuid.uuid4().hex}",
        request_id=request_id,
        subject_ref=subject_ref,
        actor=reveal.by,
        action="history.revealed",
        details={
            "workflow_id": history_lib.redact_text(workflow_id, markers),
            "reason": history_lib.redact_text(reveal.reason, markers),
            "identifiers": len(markers),
        },
    )


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
    found = await requests.listed(
        client,
        region=region,
        state=status,  # type: ignore[arg-type]
        since=since,
        limit=requests.MAX_LISTED,
    )
    rows = [
        RequestSummary(
            request=row.id,
            status=row.state,
            regions=row.regions,
            started=row.started,
            closed=row.closed,
        )
        for row in found
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
