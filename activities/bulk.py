"""The control activities of a bulk erasure (local activities of `BulkErasureWorkflow`).

They stand between the workflow and Lethe's store, where a bulk request's subjects are staged
(sealed) so that no list of all subjects is ever in a workflow's input or history:
`bulk.plan` plans the tenant's erasure once; `bulk.next_batch` takes the next subjects of a
phase and sets aside those on the forget-list (`skipped`), those a single request is erasing
(`joined`) and those under a legal hold (`held`); `bulk.record_batch` records a batch's outcomes
as Merkle leaves under one ledger entry, settles the subjects' statuses and lists them on the
forget-list; `bulk.finish` keeps the bulk certificate.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import activity
from temporalio.service import RPCError, RPCStatusCode

from lethe.activities.planning import planner_from_settings
from lethe.contracts import (
    BatchStepOutcome,
    BulkBatch,
    BulkBatchQuery,
    BulkBatchRecord,
    BulkFound,
    BulkProgress,
    BulkRecheck,
    BulkRecheckRecord,
    BulkRecorded,
    BulkRequest,
    BulkSubject,
    ErasureRequest,
    Hold,
    Plan,
    Step,
    StepStatus,
    Subject,
    SubjectStatus,
)
from lethe.evidence import bulk, certificates, forget_list, holds
from lethe.evidence.store import engine_for
from lethe.kernel.config import current_settings
from lethe.kernel.errors import LetheError
from lethe.plans.planner import needed_identities
from lethe.temporal import search_attributes as sa

PROBE_ID = "bulk-probe"
"""The subject id a bulk plan is made for: the plan depends on the tenant, not the subject
(each subject's identities are checked against it when the file is read)."""
SETTLED: tuple[StepStatus, ...] = ("done", "retained")
PROVING: tuple[StepStatus, ...] = ("pending_compaction", "at_risk", "running", "planned", "held")
_RANK: dict[SubjectStatus, int] = {"erased": 0, "incomplete": 1, "failed": 2}


async def _store() -> AsyncEngine:
    return await engine_for(current_settings().store_url.get_secret_value())


def _typed(exc: LetheError) -> BaseException:
    return exc.to_application_error()


@activity.defn(name="bulk.plan")
async def plan_bulk(request: BulkRequest) -> Plan:
    """The tenant's erasure plan, once for every subject of the request."""
    probe = ErasureRequest(
        subject=Subject(tenant=request.tenant, subject_id=PROBE_ID),
        region=request.region,
        requested_by=request.requested_by,
        reason=request.reason,
        systems=request.systems,
    )
    try:
        return planner_from_settings().plan(probe, request.bulk_id, "-", check_identities=False)
    except LetheError as exc:
        raise _typed(exc) from None


@activity.defn(name="bulk.stage_found")
async def stage_found(found: BulkFound) -> int:
    """Stage the subjects an offboarding found (those not staged yet); how many were new."""
    key = current_settings().subject_key_bytes
    return await bulk.append(await _store(), found.bulk_id, found.subjects, key)


@activity.defn(name="bulk.next_batch")
async def next_batch(query: BulkBatchQuery) -> BulkBatch:
    """The next subjects of a phase, after `after_seq`: those to erase, and those set aside."""
    engine = await _store()
    active = await holds.list_holds(engine)
    blocked_by = _blocking_all(active, query.tenant, query.steps)
    if blocked_by:
        return BulkBatch(last_seq=query.after_seq, blocked_by=blocked_by)
    statuses: tuple[SubjectStatus, ...] = ("held",) if query.held_again else ("pending",)
    if query.phase == "deferred":
        statuses = ("erased", "incomplete", "failed")
    key = current_settings().subject_key_bytes
    taken = await bulk.take(engine, query.bulk_id, query.after_seq, query.size, key, statuses)
    if not taken:
        return BulkBatch(last_seq=query.after_seq, counts=await bulk.counts(engine, query.bulk_id))
    refs = [item.subject_ref for _, item in taken]
    aside: dict[str, tuple[SubjectStatus, str]] = {}
    for ref in _held(active, refs):
        aside[ref] = ("held", "a legal hold on the subject")
    if query.phase == "immediate" and not query.held_again:
        for ref in await forget_list.listed_among(engine, refs):
            aside.setdefault(ref, ("skipped", "on the forget-list: erased before"))
        for ref, workflow_id in (await _running_singles(query.tenant, refs)).items():
            aside.setdefault(ref, ("joined", workflow_id))
    needed = needed_identities(query.steps)
    for _, item in taken:
        missing = sorted(needed - set(item.subject.identities))
        if missing:  # e.g. an offboarded subject whose email no table gave
            aside.setdefault(
                item.subject_ref, ("failed", f"identity {', '.join(missing)} not known")
            )
    if aside:
        await bulk.mark(engine, query.bulk_id, aside, None)
    subjects = [item for _, item in taken if item.subject_ref not in aside]
    return BulkBatch(
        last_seq=taken[-1][0],
        subjects=subjects,
        set_aside=dict(Counter(status for status, _ in aside.values())),
        found=await _found(engine, query, subjects),
        counts=await bulk.counts(engine, query.bulk_id),
    )


async def _found(
    engine: AsyncEngine, query: BulkBatchQuery, subjects: Sequence[BulkSubject]
) -> list[str] | None:
    """In the deferred phase, which of `subjects` the immediate phase found somewhere: whole
    backups are touched only for them. None in the other phases (every subject counts as
    found)."""
    if query.phase != "deferred" or not subjects:
        return None
    return await bulk.found(engine, query.bulk_id, [s.subject_ref for s in subjects])


def _blocking_all(active: Sequence[Hold], tenant: str, steps: Sequence[Step]) -> list[str]:
    """Holds on the tenant, a system or a category that block a step for every subject."""
    found: list[str] = []
    for step in steps:
        if step.action == "retain":
            continue
        categories = [d.category for d in step.decisions if d.category]
        found += [
            hold.id
            for hold in active
            if hold.scope != "subject"
            and holds.blocks(
                hold, subject_ref="", tenant=tenant, system=step.system, categories=categories
            )
        ]
    return sorted(set(found))


def _held(active: Sequence[Hold], refs: Iterable[str]) -> set[str]:
    held = {hold.value for hold in active if hold.active and hold.scope == "subject"}
    return held.intersection(refs)


async def _running_singles(tenant: str, refs: Sequence[str]) -> dict[str, str]:
    """The single erasures running now for any of `refs`: reference -> workflow id."""
    wanted, found = set(refs), {}
    query = (
        f"{sa.KIND.name} = 'erasure' AND {sa.TENANT.name} = '{tenant}' "
        "AND ExecutionStatus = 'Running'"
    )
    try:
        async for execution in activity.client().list_workflows(query):
            ref = execution.typed_search_attributes.get(sa.SUBJECT_REF)
            if ref in wanted:
                found[ref] = execution.id
    except RPCError as exc:
        if exc.status != RPCStatusCode.UNIMPLEMENTED:
            raise
        # A server without visibility (the time-skipping test server): no single request can
        # be found to join; production servers always have it.
        activity.logger.warning("the Temporal server has no visibility: no request to join")
    return found


@activity.defn(name="bulk.record_batch")
async def record_batch(record: BulkBatchRecord) -> BulkRecorded:
    """Record a batch: its leaves under one Merkle root in one ledger entry, each subject's
    status, and the forget-list."""
    engine = await _store()
    leaves = [
        bulk.Leaf(
            subject_ref=outcome.subject_ref,
            step_id=step.step_id,
            status=outcome.status,
            affected=outcome.affected,
        )
        for step in record.outcomes
        for outcome in step.outcomes
    ]
    try:
        recorded = await bulk.record_batch(
            engine,
            record.bulk_id,
            record.phase,
            record.batch,
            leaves,
            actor="lethe",
            tenant=record.tenant,
        )
    except LetheError as exc:
        raise _typed(exc) from None
    statuses = _statuses(record.subjects, record.outcomes)
    if record.phase == "deferred":
        statuses = _worst(statuses, await bulk.statuses(engine, record.bulk_id, record.subjects))
    # Once the batch is in the ledger, the rest touch tables of their own: at once.
    writes: list[Coroutine[Any, Any, object]] = [
        bulk.mark(engine, record.bulk_id, {r: (s, "") for r, s in statuses.items()}, record.batch),
        bulk.forget(
            engine, record.bulk_id, record.subjects, tenant=record.tenant, systems=record.systems
        ),
    ]
    if record.phase in ("immediate", "held"):
        writes.append(bulk.keep_rechecks(engine, record.bulk_id, record.batch, record.outcomes))
    await asyncio.gather(*writes)
    return BulkRecorded(
        root=recorded.root,
        ledger_hash=recorded.ledger_hash,
        statuses=dict(Counter(statuses.values())),
        failures=_failures(record.outcomes),
        counts=await bulk.counts(engine, record.bulk_id),
    )


def _statuses(
    refs: Sequence[str], outcomes: Sequence[BatchStepOutcome]
) -> dict[str, SubjectStatus]:
    """Each subject's status from its steps: failed if one failed, incomplete if one is not yet
    proven gone, else erased."""
    found: dict[str, SubjectStatus] = dict.fromkeys(refs, "erased")
    for step in outcomes:
        for outcome in step.outcomes:
            if outcome.status == "failed":
                found[outcome.subject_ref] = "failed"
            elif outcome.status not in SETTLED and found[outcome.subject_ref] == "erased":
                found[outcome.subject_ref] = "incomplete"
    return found


def _worst(
    now: dict[str, SubjectStatus], before: dict[str, SubjectStatus]
) -> dict[str, SubjectStatus]:
    return {
        ref: max(status, before.get(ref, status), key=lambda s: _RANK.get(s, 0))
        for ref, status in now.items()
    }


def _failures(outcomes: Sequence[BatchStepOutcome]) -> dict[str, int]:
    return dict(
        Counter(
            _reason(outcome.detail)
            for step in outcomes
            for outcome in step.outcomes
            if outcome.status == "failed"
        )
    )


def _reason(detail: str) -> str:
    """A failure's kind, for counting: the error's class name a detail starts with, else its
    first words (details never hold an id)."""
    head = detail.split(":", 1)[0].strip()
    return head[:80] or "failed"


@activity.defn(name="bulk.next_recheck")
async def next_recheck(bulk_id: str) -> BulkRecheck | None:
    """The next step of a batch to verify again (Kafka's `pending_compaction`), with the
    batch's subjects; None when none is left."""
    engine = await _store()
    found = await bulk.next_recheck(engine, bulk_id)
    if found is None:
        return None
    refs = [one.subject_ref for one in found.outcome.outcomes]
    key = current_settings().subject_key_bytes
    subjects = await bulk.subjects_of(engine, bulk_id, refs, key)
    return BulkRecheck(
        batch=found.batch, step_id=found.step_id, subjects=subjects, erased=found.outcome
    )


@activity.defn(name="bulk.record_recheck")
async def record_recheck(record: BulkRecheckRecord) -> BulkRecorded:
    """Record a step verified again: its leaves under one root in one ledger entry; a subject
    it now proves gone is `erased` unless another step of its batch is still to verify."""
    engine = await _store()
    step_id = record.verified.step_id
    leaves = [
        bulk.Leaf(subject_ref=o.subject_ref, step_id=step_id, status=o.status, affected=o.affected)
        for o in record.verified.outcomes
    ]
    try:
        recorded = await bulk.record_batch(
            engine,
            record.bulk_id,
            "recheck",
            record.batch,
            leaves,
            actor="lethe",
            tenant=record.tenant,
        )
    except LetheError as exc:
        raise _typed(exc) from None
    await bulk.recheck_done(engine, record.bulk_id, record.of_batch, step_id, record.verified)
    waiting = await bulk.still_pending(engine, record.bulk_id, record.of_batch)
    before = await bulk.statuses(
        engine, record.bulk_id, [o.subject_ref for o in record.verified.outcomes]
    )
    statuses: dict[str, tuple[SubjectStatus, str]] = {}
    for one in record.verified.outcomes:
        if before.get(one.subject_ref) != "incomplete":
            continue  # failed stays failed; held or other: not this step's to settle
        if one.status == "failed":
            statuses[one.subject_ref] = ("failed", "")
        elif one.status in SETTLED and one.subject_ref not in waiting:
            statuses[one.subject_ref] = ("erased", "")
    await bulk.mark(engine, record.bulk_id, statuses, None)
    return BulkRecorded(
        root=recorded.root,
        ledger_hash=recorded.ledger_hash,
        statuses=dict(Counter(status for status, _ in statuses.values())),
        failures=_failures([record.verified]),
        counts=await bulk.counts(engine, record.bulk_id),
    )


@activity.defn(name="bulk.finish")
async def finish(progress: BulkProgress) -> None:
    """Keep the bulk certificate (once, whatever the retries)."""
    await certificates.keep(await _store(), progress.bulk_id, "-", progress)
