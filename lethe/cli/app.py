"""The `lethe` command line: erasure, holds, audit, workers, health checks, codec keys, schemas,
demo."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Annotated

import typer
from rich.table import Table
from temporalio.client import Client as TemporalClient
from temporalio.client import WorkflowFailureError
from temporalio.common import WorkflowIDReusePolicy

from lethe.cli import codec_server as codec_server_commands
from lethe.cli import connectors as connector_commands
from lethe.cli import erasure as erasure_commands
from lethe.cli import keys as keys_commands
from lethe.cli import retention as retention_commands
from lethe.cli import retry as retry_commands
from lethe.cli import serve as serve_commands
from lethe.cli.audit import audit_app
from lethe.cli.bulk import bulk_app, offboard
from lethe.cli.codec import codec_app
from lethe.cli.common import err, out, run
from lethe.cli.datamap import datamap_app
from lethe.cli.db import db_app
from lethe.cli.forget import forget_app
from lethe.cli.holds import hold_app
from lethe.cli.tokens import tokens_app
from lethe.contracts import HealthCheckReport, HealthCheckRequest
from lethe.kernel.config import load_settings
from lethe.kernel.errors import LetheError
from lethe.kernel.regions import task_queue, validate_region
from lethe.temporal.connection import connect

app = typer.Typer(
    help="Lethe: durable erasure, retention and key management.", no_args_is_help=True
)
app.add_typer(codec_app, name="codec")
app.add_typer(bulk_app, name="bulk")
app.command()(offboard)
app.add_typer(hold_app, name="hold")
app.add_typer(audit_app, name="audit")
app.add_typer(forget_app, name="forget-list")
app.add_typer(db_app, name="db")
app.add_typer(datamap_app, name="datamap")
app.add_typer(tokens_app, name="tokens")
erasure_commands.register(app)
retry_commands.register(app)
codec_server_commands.register(app)
keys_commands.register(app)
retention_commands.register(app)
connector_commands.register(app)
serve_commands.register(app)

RegionOption = Annotated[str, typer.Option("--region", help="a region, e.g. eu")]


@app.command()
def worker(
    region: RegionOption,
    control: Annotated[
        bool, typer.Option("--control", help="also serve the control queue (lethe-control)")
    ] = False,
) -> None:
    """Run a worker that polls the region's task queue until SIGTERM or SIGINT."""
    from lethe import worker as worker_module

    try:
        worker_module.run(region, control=control)
    except LetheError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None


@app.command()
def ping(
    region: RegionOption,
    timeout: Annotated[float, typer.Option(help="seconds to wait for a worker")] = 30.0,
) -> None:
    """Check that a worker serves the region: a workflow round trip through its task queue."""
    run(_ping(region, timeout))


async def _ping(region: str, timeout: float) -> int:
    validate_region(region)
    settings = load_settings()
    client = await connect(settings)
    queue = task_queue(region, settings.control_queue)
    with err.status(f"waiting for a worker on {queue}"):
        report = await run_health_check(client, region, timeout, queue=queue)
    if report is None:
        err.print(
            f"[red]no worker answered on {queue} within {timeout:g}s[/red]: "
            f"start one with `lethe worker --region {region}`"
        )
        return 1
    out.print(_report_table(report))
    return 0


def health_check_id(region: str) -> str:
    """A fresh workflow id for one health check of a region."""
    return f"healthcheck-{validate_region(region)}-{uuid.uuid4().hex[:12]}"


async def run_health_check(
    client: TemporalClient,
    region: str,
    timeout: float,
    workflow_id: str | None = None,
    *,
    queue: str | None = None,
) -> HealthCheckReport | None:
    """Run the health-check workflow on the region's queue; None if no worker answers in time."""
    from lethe.workflows.healthcheck import HealthCheckWorkflow

    try:
        return await client.execute_workflow(
            HealthCheckWorkflow.run,
            HealthCheckRequest(token=uuid.uuid4().hex),
            id=workflow_id or health_check_id(region),
            task_queue=queue or task_queue(region),
            execution_timeout=timedelta(seconds=timeout),
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        )
    except WorkflowFailureError:
        return None


def _report_table(report: HealthCheckReport) -> Table:
    table = Table(title="health check", show_header=False)
    table.add_row("task queue", report.task_queue)
    table.add_row("worker", report.worker_identity)
    table.add_row("answered at", report.answered_at.isoformat(timespec="seconds"))
    return table


@app.command()
def demo(
    retention: Annotated[
        bool,
        typer.Option(
            "--retention",
            help="sweep six months of portal sessions instead, one patient on legal hold",
        ),
    ] = False,
    stack: Annotated[
        bool,
        typer.Option(
            "--stack",
            help="the same story on the running stack (`make stack`), all five kinds of system",
        ),
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="also show what each step did (its evidence)")
    ] = False,
    serve: Annotated[
        bool,
        typer.Option(
            "--serve",
            help="then keep the demo running behind the web console (LETHE_API_BIND), "
            "with a token for the demo DPO, until Ctrl-C",
        ),
    ] = False,
) -> None:
    """Seed a small hospital in SQLite, erase one patient on the embedded server, certify it."""
    from lethe.cli.demo import run_demo, run_retention_demo

    if retention and (stack or serve):
        raise typer.BadParameter(
            "--retention runs on the embedded server only, without the console: "
            "leave out --stack and --serve"
        )
    run(run_retention_demo() if retention else run_demo(stack=stack, verbose=verbose, serve=serve))
