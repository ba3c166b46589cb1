"""Bulk erasure on the command line: `lethe erase --tenant T --subjects-file F` starts one;
`lethe bulk status|pause|resume|cancel|approve|reject BULK_ID` follow and steer it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lethe.cli.common import ByOption, JsonOption, actor, err, out, run, valid
from lethe.cli.views import when
from lethe.contracts import BULK_BATCH, BULK_MAX_BATCH, ApprovalDecision, BulkProgress
from lethe.evidence.bulk import SubjectProof, check_proof
from lethe.sdk import bulk
from lethe.sdk.client import Client

bulk_app = typer.Typer(
    help="Follow and steer bulk erasures (started by `lethe erase --subjects-file`)."
)
BulkArgument = Annotated[str, typer.Argument(help="the bulk request's id (bulk-...)")]
SETTLED = ("awaiting_approval", "preflight_failed", "waiting_window", "on_hold", "paused")
"""States in which `erase --subjects-file` stops following: a person or time is next."""
CLOSED = ("completed", "cancelled", "rejected")


async def erase_many(
    *,
    tenant: str,
    subjects_file: Path,
    region: str | None,
    reason: str,
    by: str,
    batch_size: int,
    wait: bool,
    json: bool,
) -> int:
    """Check the file, stage it, start the bulk request and (unless `wait` is off) show its
    progress until a person or time is next."""
    client = await Client.connect()
    with err.status("reading and checking the subjects file (nothing is touched yet)"):
        bulk_id = await bulk.submit(
            client,
            tenant=tenant,
            subjects=subjects_file,
            requested_by=by,
            reason=reason,
            region=region,
            batch_size=batch_size,
        )
    err.print(f"bulk erasure request {bulk_id}")
    current = await (_follow(client, bulk_id, json) if wait else bulk.progress(client, bulk_id))
    _print(current, json)
    _next_step(current)
    return 0


def offboard(
    tenant: Annotated[str, typer.Option("--tenant", help="the tenant leaving the platform")],
    region: Annotated[str | None, typer.Option(help="the tenant's home region")] = None,
    reason: Annotated[str, typer.Option(help="why (recorded)")] = "",
    by: ByOption = "",
    batch_size: Annotated[
        int, typer.Option(min=1, max=BULK_MAX_BATCH, help="subjects per batch")
    ] = BULK_BATCH,
    json: JsonOption = False,
) -> None:
    """Erase every subject of a tenant: find them in each system first (touching nothing), show
    the counts per system, and wait for `lethe bulk approve` before anything is destroyed."""

    async def start() -> int:
        client = await Client.connect()
        bulk_id = await bulk.offboard(
            client,
            tenant=tenant,
            requested_by=actor(by),
            reason=reason,
            region=region,
            batch_size=batch_size,
        )
        err.print(f"offboarding request {bulk_id}: finding the tenant's subjects (read only)")
        current = await _follow(client, bulk_id, json)
        _print(current, json)
        _next_step(current)
        return 0

    run(start())


async def _follow(client: Client, bulk_id: str, json: bool) -> BulkProgress:
    stop = SETTLED + CLOSED
    if json:
        return await bulk.follow(client, bulk_id, settled=stop)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
    ) as bar:
        task = bar.add_task("subjects", total=None)

        def show(current: BulkProgress) -> None:
            counts = current.counts
            bar.update(
                task,
                total=counts.total,
                completed=counts.settled,
                description=f"{current.state} ({current.phase}), batch {current.batches}",
            )

        return await bulk.follow(client, bulk_id, show, settled=stop)


def _print(current: BulkProgress, json: bool) -> None:
    if json:
        out.print_json(current.model_dump_json(exclude={"plan"}))
        return
    out.print(progress_view(current))


def progress_view(current: BulkProgress) -> Table:
    """A bulk request's counts, per subject status and per step."""
    table = Table(title=f"{current.bulk_id} ({current.tenant}): {current.state}, {current.phase}")
    table.add_column("subjects")
    table.add_column("count", justify="right")
    for name, count in current.counts.model_dump().items():
        table.add_row(name, str(count))
    table.add_row("batches (one Merkle root each)", str(current.batches))
    for step in current.steps:
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(step.statuses.items()))
        table.add_row(f"step {step.step_id}", f"{statuses}; {step.affected} changed")
    for reason, count in sorted(current.failures.items()):
        table.add_row(f"failed: {reason}", str(count))
    for step_id, found in sorted(current.discovered.items()):
        table.add_row(f"found in {step_id}", str(found))
    for check in current.preflight:
        table.add_row(f"preflight {check.step_id}", "; ".join(check.problems))
    if current.held_by:
        table.add_row("held by", ", ".join(current.held_by))
    return table


def _next_step(current: BulkProgress) -> None:
    ident = current.bulk_id
    hints = {
        "awaiting_approval": f"approve with `lethe bulk approve {ident}`",
        "preflight_failed": "fix what the preflight found; it checks again by itself",
        "waiting_window": "the deferred steps (backups, logs) run when the erasure window ends",
        "on_hold": "waiting for a legal hold to be released",
        "paused": f"resume with `lethe bulk resume {ident}`",
    }
    if current.state in hints:
        err.print(hints[current.state])


@bulk_app.command("list")
def list_requests(
    tenant: Annotated[str | None, typer.Option(help="only this tenant's")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="how many, newest first")] = 20,
    json: JsonOption = False,
) -> None:
    """List the latest bulk requests (file erasures and offboardings) and their states."""

    async def show() -> int:
        client = await Client.connect()
        found = await bulk.recent(client, tenant=tenant, limit=limit)
        if json:
            out.print_json(data=[f.model_dump(mode="json") for f in found])
            return 0
        table = Table(title="bulk requests, newest first")
        for column in ("request", "tenant", "state", "started", "closed"):
            table.add_column(column)
        for f in found:
            table.add_row(
                f.bulk_id, f.tenant or "", f.state or "", when(f.started_at), when(f.closed_at)
            )
        out.print(table)
        return 0

    run(show())


@bulk_app.command("status")
def status(
    bulk_id: BulkArgument,
    watch: Annotated[bool, typer.Option(help="keep showing progress until it settles")] = False,
    json: JsonOption = False,
) -> None:
    """Show where a bulk erasure stands, by counts."""

    async def show() -> int:
        client = await Client.connect()
        current = await (
            _follow(client, bulk_id, json) if watch else bulk.progress(client, bulk_id)
        )
        _print(current, json)
        return 0

    run(show())


def _steer(what: str, done: str) -> None:
    def command(bulk_id: BulkArgument, by: ByOption = "") -> None:
        async def send() -> int:
            client = await Client.connect()
            await bulk.signal(client, bulk_id, what, actor(by))
            err.print(f"{done} {bulk_id}")
            return 0

        run(send())

    command.__doc__ = {
        "pause": "Pause a bulk erasure: the running batch finishes, no new one starts.",
        "resume": "Resume a paused bulk erasure.",
        "cancel": "Cancel a bulk erasure: no new batch starts; what ran stays certified.",
    }[what]
    bulk_app.command(what)(command)


_steer("pause", "pausing")
_steer("resume", "resumed")
_steer("cancel", "cancelling")


@bulk_app.command("approve")
def approve(
    bulk_id: BulkArgument,
    by: ByOption = "",
    note: Annotated[str, typer.Option(help="a note for the record")] = "",
) -> None:
    """Approve a bulk erasure waiting for the DPO."""
    decision = valid(lambda: ApprovalDecision(by=actor(by), note=note))
    run(_decide(bulk_id, decision, True))


@bulk_app.command("reject")
def reject(
    bulk_id: BulkArgument,
    by: ByOption = "",
    note: Annotated[str, typer.Option(help="the reason (recorded)")] = "",
) -> None:
    """Reject a bulk erasure waiting for the DPO; nothing is destroyed."""
    if not note:
        raise typer.BadParameter("say why with --note")
    run(_decide(bulk_id, valid(lambda: ApprovalDecision(by=actor(by), note=note)), False))


async def _decide(bulk_id: str, decision: ApprovalDecision, approved: bool) -> int:
    client = await Client.connect()
    current = await bulk.progress(client, bulk_id)
    if current.state != "awaiting_approval":
        err.print(f"[red]error:[/red] {bulk_id} is {current.state}, not awaiting approval")
        return 2
    await bulk.decide(client, bulk_id, decision, approved)
    err.print(f"{'approved' if approved else 'rejected'} {bulk_id}")
    return 0


async def bulk_certificate(client: Client, bulk_id: str, json: bool) -> int:
    """A bulk request's certificate: its totals per step and system, failures by reason, and
    every batch's Merkle root with the ledger entry holding it."""
    current = await bulk.progress(client, bulk_id)
    roots = await bulk.roots(client, bulk_id)
    if json:
        out.print_json(
            data={
                **current.model_dump(mode="json"),
                "batch_roots": [r.model_dump(mode="json") for r in roots],
            }
        )
        return 0
    out.print(progress_view(current))
    table = Table(title="Merkle roots, one per batch (lethe audit verify checks them)")
    for column in ("batch", "phase", "subjects' outcomes", "root", "ledger entry"):
        table.add_column(column)
    for r in roots:
        table.add_row(str(r.batch), r.phase, str(r.size), r.root, f"#{r.ledger_seq}")
    out.print(table)
    return 0


def proofs_view(proofs: list[SubjectProof]) -> Table:
    """One subject's outcomes in a bulk request, each with whether its proof holds."""
    table = Table(title="the subject's outcomes in its bulk request (Merkle inclusion proofs)")
    for column in (
        "phase",
        "batch",
        "step",
        "status",
        "changed",
        "leaf",
        "root",
        "ledger",
        "proof",
    ):
        table.add_column(column)
    for proof in proofs:
        table.add_row(
            proof.phase,
            str(proof.batch),
            proof.step_id,
            proof.status,
            str(proof.affected),
            f"{proof.index + 1} of {proof.size}",
            proof.root[:16],
            f"#{proof.ledger_seq}",
            "[green]holds[/green]" if check_proof(proof) else "[red]BROKEN[/red]",
        )
    return table
