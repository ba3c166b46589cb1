"""The DPO's erasure commands: erase, status, approve, reject, extend and certificate."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.text import Text

from lethe.classification.datamap import load_datamap
from lethe.classification.routing import systems_of
from lethe.cli.bulk import bulk_certificate, erase_many, proofs_view
from lethe.cli.common import (
    ByOption,
    JsonOption,
    RequestArgument,
    SubjectOption,
    TenantOption,
    VerboseOption,
    actor,
    err,
    out,
    request_id,
    run,
    valid,
)
from lethe.cli.views import (
    certificate_view,
    changes,
    plan_table,
    preflight_view,
    status_view,
    when,
)
from lethe.contracts import (
    BULK_BATCH,
    BULK_MAX_BATCH,
    ApprovalDecision,
    ErasureRequest,
    ErasureStatus,
    Extension,
    Subject,
)
from lethe.evidence.bulk import check_proof
from lethe.kernel.config import load_settings
from lethe.kernel.errors import LetheError
from lethe.sdk import bulk
from lethe.sdk.client import Client, RequestFailed, UnknownRequest

POLL_SECONDS = 1.0
SETTLED = (
    "preflight_failed",
    "awaiting_approval",
    "on_hold",
    "waiting_window",
    "completed",
    "rejected",
    "dry_run",
)
"""States in which `erase` stops waiting: the next move is a person's, or time's."""
ENDED = ("preflight_failed", "on_hold", "completed", "rejected", "failed")
"""States past the erasure window: the request is over, or waits for a person."""
PLANNED_WITHIN_SECONDS = 30
"""How long `erase --no-wait` waits for planning, so a request that cannot be planned fails."""


def register(app: typer.Typer) -> None:
    """Add the erasure commands to the `lethe` app."""
    app.command()(erase)
    app.command()(status)
    app.command()(approve)
    app.command()(reject)
    app.command()(extend)
    app.command()(certificate)
    app.command()(recheck)


def _identities(pairs: list[str]) -> dict[str, str]:
    identities: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise typer.BadParameter("--identity takes NAME=VALUE, e.g. email=ada@example.org")
        identities[name] = value
    return identities


def erase(
    tenant: Annotated[str, typer.Option("--tenant", help="the subject's tenant")],
    subject: Annotated[
        str | None, typer.Option("--subject", help="the subject id (never shown or logged)")
    ] = None,
    identity: Annotated[
        list[str], typer.Option("--identity", help="another identifier, NAME=VALUE (repeatable)")
    ] = [],  # noqa: B006 - typer reads the default, never mutates it
    region: Annotated[str | None, typer.Option(help="the subject's home region")] = None,
    reason: Annotated[str, typer.Option(help="why (recorded)")] = "",
    by: ByOption = "",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the plan, touch nothing")
    ] = False,
    wait: Annotated[bool, typer.Option(help="show progress until a person or time is next")] = True,
    json: JsonOption = False,
    subjects_file: Annotated[
        Path | None,
        typer.Option(
            "--subjects-file",
            help="erase many subjects of the tenant: CSV with a subject_id column (other "
            "columns are identities) or JSON lines; a bulk request",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(min=1, max=BULK_MAX_BATCH, help="subjects per batch (--subjects-file)")
    ] = BULK_BATCH,
) -> None:
    """Erase a subject everywhere the data map says their data lives (or --dry-run the plan);
    with --subjects-file, every subject of a file, in batches (a bulk request)."""
    if (subject is None) == (subjects_file is None):
        raise typer.BadParameter("give either --subject or --subjects-file")
    if subjects_file is not None:
        if identity or dry_run:
            raise typer.BadParameter(
                "--identity and --dry-run are for one subject; a subjects file gives identities "
                "as columns"
            )
        run(
            erase_many(
                tenant=tenant,
                subjects_file=subjects_file,
                region=region,
                reason=reason,
                by=actor(by),
                batch_size=batch_size,
                wait=wait,
                json=json,
            )
        )
        return
    assert subject is not None
    request = valid(
        lambda: ErasureRequest(
            subject=Subject(tenant=tenant, subject_id=subject, identities=_identities(identity)),
            region=region,
            reason=reason,
            requested_by=actor(by),
        )
    )
    run(_erase(request, dry_run, wait, json))


async def _erase(request: ErasureRequest, dry_run: bool, wait: bool, json: bool) -> int:
    settings = load_settings()
    if settings.datamap is not None:
        # Refuse an unknown tenant or a contradicting region before any workflow starts.
        try:
            systems_of(load_datamap(settings.datamap), request.subject.tenant, request.region)
        except LetheError as exc:
            raise RequestFailed(
                f"the request cannot be planned: {type(exc).__name__}: {exc}"
            ) from None
    client = await Client.connect(settings)
    if dry_run:
        with err.status("planning and checking every system (nothing will be touched)"):
            found = await client.plan(request)
        if json:
            # The plan as before, with each step's preflight beside it.
            out.print_json(
                data={
                    **found.plan.model_dump(mode="json"),
                    "preflight": [c.model_dump(mode="json") for c in found.preflight],
                }
            )
        else:
            out.print(plan_table(found.plan))
            out.print(preflight_view(found.preflight))
        if found.plan.approval_required:
            err.print(f"approval will be required: {found.plan.approval_reason}")
        if not found.ready:
            err.print("[red]the preflight found problems[/red]: an erasure would wait until fixed")
            return 1
        return 0
    submitted = await client.erase(request)
    workflow_id = submitted.workflow_id
    if submitted.joined:
        err.print(f"joined erasure request {workflow_id}, already running for this subject")
        if request.subject.identities:
            err.print(
                "[red]error:[/red] the identities given now were not added to the running "
                f"request; when it finishes (`lethe status {workflow_id}`), run `lethe erase` "
                "again with them"
            )
            return 3
    else:
        err.print(f"erasure request {workflow_id}")
    if not wait:
        # Planning takes a moment: a request that cannot be planned fails here, not silently.
        current = await _planned(client, workflow_id)
        if json:
            out.print_json(data={"request": workflow_id, "state": current.state})
        return 0
    current = await follow(client, workflow_id)
    if json:
        out.print_json(current.model_dump_json())
    _next_step(workflow_id, current)
    return 0


async def _planned(client: Client, workflow_id: str) -> ErasureStatus:
    """The status once planning is over (RequestFailed if it failed)."""
    current = await client.status(workflow_id)
    for _ in range(int(PLANNED_WITHIN_SECONDS / POLL_SECONDS)):
        if current.state != "planning":
            break
        await asyncio.sleep(POLL_SECONDS)
        current = await client.status(workflow_id)
    return current


class Watch:
    """Shows one request's progress on stderr: redrawn in place on a terminal (rich's Live),
    one line per change when stderr is not a terminal (a log, a pipe, CI).

    `keep` leaves the last status's table on screen at the end (on a terminal the live
    display stays; otherwise the table is printed once); `say` puts a message on lines of its
    own, above the live display, never into a table.
    """

    def __init__(
        self, *, keep: bool = True, verbose: bool = False, console: Console | None = None
    ) -> None:
        self.console = console or err
        self.keep, self.verbose = keep, verbose
        self.last: ErasureStatus | None = None
        self._live: Live | None = None

    def __enter__(self) -> Watch:
        if self.console.is_terminal:
            self._live = Live(
                Text(""), console=self.console, refresh_per_second=4, transient=not self.keep
            )
            self._live.start()
        return self

    def show(self, current: ErasureStatus) -> None:
        """Show a status: redraw the live display, or print one line per change."""
        if self._live is not None:
            self._live.update(status_view(current, verbose=self.verbose))
        else:
            for line in changes(self.last, current):
                self.console.print(line, highlight=False, soft_wrap=True)
        self.last = current

    def say(self, message: str) -> None:
        """A message on lines of its own (above the live display on a terminal)."""
        self.console.print(message, highlight=False, soft_wrap=False)

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if self._live is not None:
            self._live.stop()
        elif self.keep and kind is None and self.last is not None:
            self.console.print(status_view(self.last, verbose=self.verbose))


async def follow(
    client: Client,
    workflow_id: str,
    *,
    watch: Watch | None = None,
    keep: bool = True,
    until: tuple[str, ...] = SETTLED,
) -> ErasureStatus:
    """Show the status (in `watch`, else a new Watch) until the erasure is in a state of
    `until` (by default: settled); the last status."""
    if watch is None:
        with Watch(keep=keep) as fresh:
            return await follow(client, workflow_id, watch=fresh, until=until)
    current = await client.status(workflow_id)
    watch.show(current)
    while current.state not in until:
        await asyncio.sleep(POLL_SECONDS)
        current = await client.status(workflow_id)
        watch.show(current)
    return current


def _next_step(workflow_id: str, current: ErasureStatus) -> None:
    if current.state == "preflight_failed":
        err.print(
            "the preflight found problems, so nothing has been destroyed: fix the system or "
            f"the data map, then `lethe recheck {workflow_id}` (it also retries by itself, "
            f"next at {when(current.next_preflight_at)})"
        )
    elif current.state == "awaiting_approval":
        err.print(
            f"waiting for approval: `lethe approve {workflow_id} --by NAME` "
            f"or `lethe reject {workflow_id} --by NAME --note REASON` "
            f"(deadline {when(current.deadline)})"
        )
    elif current.state == "on_hold":
        err.print("some steps wait for a legal hold to be released: `lethe hold list`")
    elif current.state == "waiting_window":
        err.print(
            f"immediate phase done; backups and logs follow by {when(current.window_ends_at)}. "
            f"`lethe status {workflow_id}` shows progress; "
            f"`lethe certificate {workflow_id}` the result."
        )
    elif current.state == "completed":
        err.print(f"completed: `lethe certificate {workflow_id}`")


def status(
    request: RequestArgument = None,
    tenant: TenantOption = None,
    subject: SubjectOption = None,
    watch: Annotated[bool, typer.Option(help="keep showing progress until it settles")] = False,
    verbose: VerboseOption = False,
    json: JsonOption = False,
) -> None:
    """Show where an erasure stands, step by step."""
    run(_status(request, tenant, subject, watch, verbose, json))


async def _status(
    request: str | None,
    tenant: str | None,
    subject: str | None,
    watch: bool,
    verbose: bool,
    json: bool,
) -> int:
    client = await Client.connect()
    workflow_id = request_id(client, request, tenant, subject)
    # Watching, the progress is drawn on stderr and goes; the settled status is printed once.
    current = await (
        follow(client, workflow_id, keep=False) if watch else client.status(workflow_id)
    )
    if json:
        out.print_json(current.model_dump_json())
    else:
        out.print(status_view(current, verbose=verbose))
    return 0


def approve(
    request: RequestArgument = None,
    tenant: TenantOption = None,
    subject: SubjectOption = None,
    by: ByOption = "",
    note: Annotated[str, typer.Option(help="a note for the record")] = "",
) -> None:
    """Approve an erasure that waits for the DPO."""
    run(
        _decide(
            request, tenant, subject, valid(lambda: ApprovalDecision(by=actor(by), note=note)), True
        )
    )


def reject(
    request: RequestArgument = None,
    tenant: TenantOption = None,
    subject: SubjectOption = None,
    by: ByOption = "",
    note: Annotated[str, typer.Option(help="the reason (recorded)")] = "",
) -> None:
    """Reject an erasure that waits for the DPO; nothing is destroyed."""
    if not note:
        raise typer.BadParameter("say why with --note")
    run(
        _decide(
            request,
            tenant,
            subject,
            valid(lambda: ApprovalDecision(by=actor(by), note=note)),
            False,
        )
    )


async def _decide(
    request: str | None,
    tenant: str | None,
    subject: str | None,
    decision: ApprovalDecision,
    approved: bool,
) -> int:
    client = await Client.connect()
    workflow_id = request_id(client, request, tenant, subject)
    current = await client.status(workflow_id)
    if current.state != "awaiting_approval":
        err.print(f"[red]error:[/red] {workflow_id} is {current.state}, not awaiting approval")
        return 2
    await (client.approve if approved else client.reject)(workflow_id, decision)
    err.print(f"{'approved' if approved else 'rejected'} {workflow_id}")
    return 0


def extend(
    request: RequestArgument = None,
    tenant: TenantOption = None,
    subject: SubjectOption = None,
    months: Annotated[int, typer.Option(min=1, max=2, help="1 or 2 more months")] = 2,
    reason: Annotated[str, typer.Option(help="why (GDPR Art. 12(3) requires it)")] = "",
    by: ByOption = "",
) -> None:
    """Extend an erasure's deadline by up to two months, with the reason (Art. 12(3))."""
    run(
        _extend(
            request,
            tenant,
            subject,
            valid(lambda: Extension(months=months, reason=reason, by=actor(by))),
        )
    )


async def _extend(
    request: str | None, tenant: str | None, subject: str | None, extension: Extension
) -> int:
    client = await Client.connect()
    workflow_id = request_id(client, request, tenant, subject)
    before = await client.status(workflow_id)
    if before.extension is not None:
        err.print(f"[red]error:[/red] {workflow_id} was already extended once")
        return 2
    await client.extend(workflow_id, extension)
    err.print(f"extended {workflow_id} by {extension.months} month(s)")
    return 0


def certificate(
    request: RequestArgument = None,
    tenant: TenantOption = None,
    subject: SubjectOption = None,
    verbose: VerboseOption = False,
    json: JsonOption = False,
) -> None:
    """Print the certificate of a finished erasure (each step's evidence with --verbose)."""
    run(_certificate(request, tenant, subject, verbose, json))


async def _certificate(
    request: str | None, tenant: str | None, subject: str | None, verbose: bool, json: bool
) -> int:
    client = await Client.connect()
    if request is not None and request.startswith("bulk-"):
        return await bulk_certificate(client, request, json)
    try:
        found = await client.certificate(request_id(client, request, tenant, subject))
    except UnknownRequest:
        if tenant is None or subject is None:
            raise
        # Not a request of its own: the subject may have been erased by a bulk request.
        proofs = await bulk.subject_proofs(client, tenant, subject)
        if json:
            out.print_json(data=[p.model_dump(mode="json") for p in proofs])
        else:
            out.print(proofs_view(proofs))
        return 0 if all(check_proof(p) for p in proofs) else 1
    if json:
        # The summary (failures with reasons, caveats with dates) first, then the evidence.
        out.print_json(data={"summary": found.summary(), **found.model_dump(mode="json")})
    else:
        out.print(certificate_view(found, verbose=verbose))
    return 0


def recheck(
    request: RequestArgument = None,
    tenant: TenantOption = None,
    subject: SubjectOption = None,
) -> None:
    """Run a request's preflight again now (after fixing what it found), not at its next retry."""
    run(_recheck(request, tenant, subject))


async def _recheck(request: str | None, tenant: str | None, subject: str | None) -> int:
    client = await Client.connect()
    workflow_id = request_id(client, request, tenant, subject)
    current = await client.status(workflow_id)
    if current.state != "preflight_failed":
        err.print(f"[red]error:[/red] {workflow_id} is {current.state}, not waiting on a preflight")
        return 2
    await client.recheck(workflow_id)
    err.print(f"checking {workflow_id} again: `lethe status {workflow_id}` shows the result")
    return 0
