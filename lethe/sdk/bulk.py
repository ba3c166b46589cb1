"""Bulk erasure for services and the CLI: submit many subjects of one tenant, follow the request
by counts, pause, resume or cancel it, and prove one subject's outcome.

A bulk request is the workflow `BulkErasureWorkflow` on the control queue, its id `bulk-<12
hex>`. Its subjects are checked whole before anything is staged (a bad line refuses the file),
then staged sealed in Lethe's store; the workflow reads them batch by batch. Each batch's
outcomes are leaves of a Merkle tree whose root is in the ledger, so one subject's outcome is
proven by its leaf, its inclusion proof and the ledger entry.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select
from temporalio.client import WorkflowExecutionStatus
from temporalio.common import SearchAttributePair, TypedSearchAttributes

from lethe.classification.datamap import load_datamap
from lethe.classification.routing import systems_of
from lethe.contracts import (
    BULK_BATCH,
    BULK_MAX_SUBJECTS,
    TENANT_PATTERN,
    ApprovalDecision,
    BulkProgress,
    BulkRequest,
    Contract,
    ErasureRequest,
    Subject,
)
from lethe.evidence import bulk
from lethe.evidence.store import bulk_subjects, certificates, engine_for
from lethe.kernel.errors import LetheError
from lethe.kernel.subjects_file import SubjectsFileError, read_subjects
from lethe.plans.planner import Planner, needed_identities
from lethe.sdk.client import Client, UnknownRequest, answer
from lethe.sdk.schedules import listed
from lethe.temporal import search_attributes as sa
from lethe.workflows.bulk_erasure import KIND, BulkErasureWorkflow

QUERY_TIMEOUT = timedelta(seconds=12)
"""Longer than the sticky-queue timeout (10 s), so a query right after a worker crash answers."""


class BulkRefused(LetheError):
    """A bulk request refused before anything was staged or started."""


def new_bulk_id() -> str:
    """A new bulk request id (`bulk-<12 hex>`; no subject's data in it)."""
    return f"bulk-{uuid.uuid4().hex[:12]}"


async def submit(
    client: Client,
    *,
    tenant: str,
    subjects: Path | Iterable[Subject],
    requested_by: str,
    reason: str = "",
    region: str | None = None,
    systems: list[str] | None = None,
    batch_size: int = BULK_BATCH,
    batches_per_run: int | None = None,
) -> str:
    """Check the subjects (a subjects file, or Subject objects), stage them sealed in Lethe's
    store and start the bulk request; its id. A bad line, an unknown tenant or a subject without
    an identity the plan needs is refused before anything is staged."""
    needed = _needed_identities(client, tenant, region, systems or [], requested_by)
    rows = _subjects(tenant, subjects, needed)
    engine = await engine_for(client.settings.store_url.get_secret_value())
    bulk_id = new_bulk_id()
    total = await bulk.stage(engine, bulk_id, rows(), client.settings.subject_key_bytes)
    if total == 0:
        raise BulkRefused("no subjects to erase: the file holds none")
    request = BulkRequest(
        bulk_id=bulk_id,
        tenant=tenant,
        region=region,
        requested_by=requested_by,
        reason=reason,
        total=total,
        systems=systems or [],
        batch_size=batch_size,
        received_at=datetime.now(UTC),
        **({"batches_per_run": batches_per_run} if batches_per_run else {}),
    )
    await _start(client, request)
    return bulk_id


async def offboard(
    client: Client,
    *,
    tenant: str,
    requested_by: str,
    reason: str = "",
    region: str | None = None,
    batch_size: int = BULK_BATCH,
) -> str:
    """Start a tenant's offboarding: a bulk request that first finds every subject the data
    map's systems hold for the tenant (reading only), then waits for the DPO's approval with
    the counts per system before anything is destroyed; its id."""
    _needed_identities(client, tenant, region, [], requested_by)  # an unknown tenant: refused
    bulk_id = new_bulk_id()
    request = BulkRequest(
        bulk_id=bulk_id,
        tenant=tenant,
        region=region,
        requested_by=requested_by,
        reason=reason or f"tenant {tenant} leaves the platform",
        source="offboard",
        total=0,
        batch_size=batch_size,
        received_at=datetime.now(UTC),
    )
    await _start(client, request)
    return bulk_id


async def _start(client: Client, request: BulkRequest) -> None:
    await client.temporal.start_workflow(
        BulkErasureWorkflow.run,
        request,
        id=request.bulk_id,
        task_queue=client.settings.control_queue,
        search_attributes=TypedSearchAttributes(
            [
                SearchAttributePair(sa.KIND, KIND),
                SearchAttributePair(sa.STATUS, "planning"),
                SearchAttributePair(sa.TENANT, request.tenant),
            ]
        ),
    )


def _needed_identities(
    client: Client, tenant: str, region: str | None, systems: list[str], by: str
) -> set[str]:
    """The identities every subject must give, from planning the tenant here (refusing an
    unknown tenant early); nothing when this process has no data map (the worker checks)."""
    settings = client.settings
    if settings.datamap is None or settings.policy is None:
        return set()
    try:
        systems_of(load_datamap(settings.datamap), tenant, region)
        plan = Planner.from_files(settings.datamap, settings.policy).plan(
            ErasureRequest(
                subject=Subject(tenant=tenant, subject_id="bulk-probe"),
                region=region,
                requested_by=by,
                systems=systems,
            ),
            "bulk-check",
            "-",
            check_identities=False,
        )
    except LetheError as exc:
        raise BulkRefused(f"the request cannot be planned: {type(exc).__name__}: {exc}") from None
    return needed_identities(step for region in plan.regions for step in region.steps)


def _subjects(
    tenant: str, given: Path | Iterable[Subject], needed: set[str]
) -> Callable[[], Iterable[Subject]]:
    """The subjects to stage, checked whole first (a file: every line, before anything)."""
    if isinstance(given, Path):

        def from_file() -> Iterable[Subject]:
            for row in read_subjects(given, limit=BULK_MAX_SUBJECTS):
                missing = sorted(needed - set(row.identities))
                if missing:
                    raise SubjectsFileError(
                        given,
                        row.line,
                        f"the plan needs identity {', '.join(missing)} for every subject",
                    )
                yield Subject(tenant=tenant, subject_id=row.subject_id, identities=row.identities)

        # A first pass reads and checks every line: nothing is staged on a refusal.
        for _ in from_file():
            pass
        return from_file
    listed = list(given)
    for subject in listed:
        if subject.tenant != tenant:
            raise BulkRefused("every subject of a bulk request must be of its tenant")
        missing = sorted(needed - set(subject.identities))
        if missing:
            raise BulkRefused(f"the plan needs identity {', '.join(missing)} for every subject")
    return lambda: listed


class BulkListed(Contract):
    """A bulk request as visibility lists it (no query to its workflow)."""

    bulk_id: str
    tenant: str | None
    state: str | None
    started_at: datetime | None
    closed_at: datetime | None


async def recent(client: Client, *, tenant: str | None = None, limit: int = 20) -> list[BulkListed]:
    """The latest bulk requests on this deployment's control queue, newest first."""
    query = f"{sa.KIND.name} = '{KIND}' AND TaskQueue = '{client.settings.control_queue}'"
    if tenant is not None:
        if not re.fullmatch(TENANT_PATTERN, tenant):
            raise BulkRefused("a tenant is lower-case letters, digits, _ and -")
        query += f" AND {sa.TENANT.name} = '{tenant}'"
    return [
        BulkListed(
            bulk_id=found.id,
            tenant=found.typed_search_attributes.get(sa.TENANT),
            state=found.typed_search_attributes.get(sa.STATUS),
            started_at=found.start_time,
            closed_at=found.close_time,
        )
        for found in await listed(client.temporal, query, limit)
    ]


async def progress(client: Client, bulk_id: str) -> BulkProgress:
    """Where a bulk request stands (running: its query; closed: its certificate)."""
    handle = client.temporal.get_workflow_handle(bulk_id)
    described = await answer(
        handle.describe(), what=bulk_id, unknown=UnknownRequest(f"no bulk request {bulk_id}")
    )
    if described.status == WorkflowExecutionStatus.RUNNING:
        return await answer(
            handle.query(BulkErasureWorkflow.progress, rpc_timeout=QUERY_TIMEOUT),
            what=bulk_id,
            unknown=UnknownRequest(f"no bulk request {bulk_id}"),
        )
    if described.status == WorkflowExecutionStatus.COMPLETED:
        return BulkProgress.model_validate(await handle.result())
    ended = described.status.name.lower() if described.status else "unknown"
    raise LetheError(f"bulk request {bulk_id} ended {ended}")


async def follow(
    client: Client,
    bulk_id: str,
    on_progress: Callable[[BulkProgress], None] | None = None,
    *,
    settled: tuple[str, ...] = ("completed", "cancelled", "rejected"),
    every: float = 1.0,
) -> BulkProgress:
    """Poll a bulk request until it reaches one of `settled`, telling `on_progress` each time."""
    while True:
        current = await progress(client, bulk_id)
        if on_progress is not None:
            on_progress(current)
        if current.state in settled:
            return current
        await asyncio.sleep(every)


async def signal(client: Client, bulk_id: str, what: str, by: str) -> None:
    """Pause, resume or cancel a bulk request (`what`), as `by`."""
    handle = client.temporal.get_workflow_handle(bulk_id)
    signals = {
        "pause": BulkErasureWorkflow.pause,
        "resume": BulkErasureWorkflow.resume,
        "cancel": BulkErasureWorkflow.cancel,
    }
    await answer(
        handle.signal(signals[what], by),
        what=bulk_id,
        unknown=UnknownRequest(f"no running bulk request {bulk_id}"),
    )


async def decide(client: Client, bulk_id: str, decision: ApprovalDecision, approved: bool) -> None:
    """Approve or reject a bulk request waiting for the DPO."""
    handle = client.temporal.get_workflow_handle(bulk_id)
    chosen = BulkErasureWorkflow.approve if approved else BulkErasureWorkflow.reject
    await answer(
        handle.signal(chosen, decision),
        what=bulk_id,
        unknown=UnknownRequest(f"no running bulk request {bulk_id}"),
    )


async def bulk_of(client: Client, tenant: str, subject_id: str) -> str | None:
    """The latest bulk request that took this subject, if any."""
    ref = client.subject_ref(tenant, subject_id)
    engine = await engine_for(client.settings.store_url.get_secret_value())
    async with engine.connect() as conn:
        found = await conn.execute(
            select(bulk_subjects.c.bulk_id).where(bulk_subjects.c.subject_ref == ref)
        )
        ids = [row[0] for row in found]
        if not ids:
            return None
        issued = await conn.execute(
            select(certificates.c.request_id)
            .where(certificates.c.request_id.in_(ids))
            .order_by(certificates.c.issued_at.desc())
        )
        first = issued.first()
        return str(first[0]) if first else ids[-1]


async def roots(client: Client, bulk_id: str) -> list[bulk.BatchRecord]:
    """Every batch's Merkle root of a bulk request, with the ledger entry holding it."""
    engine = await engine_for(client.settings.store_url.get_secret_value())
    return await bulk.batches(engine, bulk_id)


async def subject_proofs(client: Client, tenant: str, subject_id: str) -> list[bulk.SubjectProof]:
    """This subject's outcomes in its bulk request, each with its Merkle inclusion proof."""
    bulk_id = await bulk_of(client, tenant, subject_id)
    if bulk_id is None:
        raise UnknownRequest("no erasure request and no bulk request for this subject")
    engine = await engine_for(client.settings.store_url.get_secret_value())
    return await bulk.proofs(engine, bulk_id, client.subject_ref(tenant, subject_id))


async def requester(client: Client, bulk_id: str) -> str | None:
    """Who submitted a bulk request: from its current run's start (each run's input is the
    BulkRequest, carried across continue-as-new)."""
    handle = client.temporal.get_workflow_handle(bulk_id)
    async for event in handle.fetch_history_events(page_size=1):
        payloads = event.workflow_execution_started_event_attributes.input.payloads
        start = (await client.temporal.data_converter.decode(payloads, [BulkRequest]))[0]
        return start.requested_by if isinstance(start, BulkRequest) else None
    return None
