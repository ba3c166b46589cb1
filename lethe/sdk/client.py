"""Lethe's SDK: `Client` starts and follows erasures (`connect`, in `lethe.temporal.connection`,
reaches Temporal with the codec)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client as TemporalClient
from temporalio.client import (
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowQueryFailedError,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from lethe.classification.datamap import load_datamap
from lethe.contracts import (
    ApprovalDecision,
    Certificate,
    DryRun,
    ErasureRequest,
    ErasureStart,
    ErasureStatus,
    Extension,
    Hold,
    HoldScope,
    RetryOf,
    StepOutcome,
    Submission,
)
from lethe.evidence import forget_list, holds
from lethe.evidence.forget_list import ForgetListEntry
from lethe.evidence.store import engine_for
from lethe.kernel.config import Settings, load_settings
from lethe.kernel.errors import LetheError, ServiceUnavailable, failure_reason
from lethe.kernel.subjects import subject_ref
from lethe.temporal import search_attributes as sa
from lethe.temporal.connection import connect
from lethe.workflows.erasure import ErasureWorkflow
from lethe.workflows.regional_erasure import RegionalErasureWorkflow

CHILD_QUERY_TIMEOUT = timedelta(seconds=5)
QUERY_TIMEOUT = timedelta(seconds=20)
"""Longer than the sticky-queue timeout (10 s), so a query right after a worker crash answers."""
T = TypeVar("T")


async def answer(query: Awaitable[T], *, what: str, unknown: LetheError) -> T:
    """A workflow query's answer; `unknown` when there is no such workflow, ServiceUnavailable
    naming `what` when no control worker answers or the query fails."""
    try:
        return await query
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise unknown from None
        raise ServiceUnavailable(
            f"{what} did not come back ({exc.status.name}): queries are answered by a control "
            "worker; is one running (`lethe worker --region R --control`)?"
        ) from None
    except WorkflowQueryFailedError as exc:
        raise ServiceUnavailable(f"{what}: the query failed: {exc}") from None


class UnknownRequest(LetheError):
    """No erasure request matches what was asked for."""


class RequestFailed(LetheError):
    """An erasure request ended in failure (e.g. it could not be planned)."""


class RetryRefused(LetheError):
    """A request whose steps cannot be retried; the message says why and what to do."""


@dataclass(frozen=True)
class RetryStarted:
    """A retry that started: a new run of the request's workflow id."""

    workflow_id: str
    request_id: str
    """The retry's own request id (its certificate's)."""
    retry_of: str
    """The original request, whose approval stands."""
    steps: list[str]
    approved_by: str | None
    """Who approved the original request (None: its plan needed no approval; should the plan
    made now need one, the retry waits for it)."""


FAILED_STATES = (
    WorkflowExecutionStatus.FAILED,
    WorkflowExecutionStatus.TERMINATED,
    WorkflowExecutionStatus.TIMED_OUT,
    WorkflowExecutionStatus.CANCELED,
)
SETTLED_STATES = ("completed", "rejected", "dry_run")
"""States the workflow itself ends in; any other state of a closed workflow is stale."""


def erasure_workflow_id(subject_ref: str) -> str:
    """The erasure workflow id of a subject: a second request joins the running one."""
    return f"erasure-{subject_ref}"


class Client:
    """Lethe's SDK for services and the CLI: start, follow, approve and audit erasures.

    Subjects are named by tenant and subject id; the client turns them into subject references
    (LETHE_SUBJECT_KEY) before anything reaches Temporal's ids or search attributes.
    """

    def __init__(self, temporal: TemporalClient, settings: Settings) -> None:
        self.temporal = temporal
        self.settings = settings

    @classmethod
    async def connect(cls, settings: Settings | None = None) -> Client:
        """Connect with the settings from the environment (or those given)."""
        settings = settings or load_settings()
        return cls(await connect(settings), settings)

    def subject_ref(self, tenant: str, subject_id: str) -> str:
        """The subject reference of (tenant, subject id)."""
        return subject_ref(tenant, subject_id, self.settings.subject_key_bytes)

    def workflow_id(self, tenant: str, subject_id: str) -> str:
        """The erasure workflow id for a subject."""
        return erasure_workflow_id(self.subject_ref(tenant, subject_id))

    async def erase(self, request: ErasureRequest) -> Submission:
        """Start the erasure of a subject, or join the one already running (then `joined`
        is true, and this request's identities and reason are not added to it).

        A dry run plans without touching anything: use `plan` for that.
        """
        if request.dry_run:
            raise ValueError("use Client.plan for a dry run")
        ref = self.subject_ref(request.subject.tenant, request.subject.subject_id)
        workflow_id = erasure_workflow_id(ref)
        try:
            await self.temporal.start_workflow(
                ErasureWorkflow.run,
                self._start(request, ref),
                id=workflow_id,
                task_queue=self.settings.control_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                search_attributes=self._search_attributes(request, ref),
            )
        except WorkflowAlreadyStartedError:
            return Submission(workflow_id=workflow_id, joined=True)
        return Submission(workflow_id=workflow_id, joined=False)

    async def plan(self, request: ErasureRequest) -> DryRun:
        """The plan an erasure would follow and each step's preflight; nothing is touched."""
        ref = self.subject_ref(request.subject.tenant, request.subject.subject_id)
        dry = request.model_copy(update={"dry_run": True})
        try:
            certificate = await self.temporal.execute_workflow(
                ErasureWorkflow.run,
                self._start(dry, ref),
                id=f"erasure-dryrun-{ref}-{uuid.uuid4().hex[:8]}",
                task_queue=self.settings.control_queue,
                search_attributes=self._search_attributes(dry, ref),
                execution_timeout=timedelta(minutes=5),
            )
        except WorkflowFailureError as exc:
            raise RequestFailed(f"the request cannot be planned: {failure_reason(exc)}") from None
        return DryRun(plan=certificate.plan, preflight=certificate.preflight)

    async def status(self, workflow_id: str) -> ErasureStatus:
        """Where an erasure stands, step by step."""
        handle = self.temporal.get_workflow_handle_for(ErasureWorkflow.run, workflow_id)
        current = await answer(
            handle.query(ErasureWorkflow.status, rpc_timeout=QUERY_TIMEOUT),
            what=f"the status of {workflow_id}",
            unknown=UnknownRequest(f"no erasure request {workflow_id}"),
        )
        if current.state not in SETTLED_STATES:
            # A failed workflow still answers queries with the state it failed in.
            await self._raise_if_failed(handle)
        return await self._with_region_progress(handle, current)

    async def _with_region_progress(
        self, handle: WorkflowHandle[Any, Any], current: ErasureStatus
    ) -> ErasureStatus:
        """Fill in the retries of running steps, and (for requests started before the steps
        ran from the request itself) the steps its regional workflows have finished (best
        effort)."""
        finished: dict[str, StepOutcome] = {}
        retrying: dict[str, dict[str, object]] = {}
        if not current.children and any(s.status == "running" for s in current.steps):
            with contextlib.suppress(RPCError):
                retrying.update(await self._retries(handle))
        for child in current.children:
            handle = self.temporal.get_workflow_handle_for(RegionalErasureWorkflow.run, child)
            with contextlib.suppress(RPCError, WorkflowQueryFailedError):
                finished.update(
                    await handle.query(
                        RegionalErasureWorkflow.progress, rpc_timeout=CHILD_QUERY_TIMEOUT
                    )
                )
            with contextlib.suppress(RPCError):
                retrying.update(await self._retries(handle))
        if not finished and not retrying:
            return current
        steps = []
        for step in current.steps:
            if step.status == "running" and step.step_id in finished:
                done = finished[step.step_id]
                step = step.model_copy(update={"status": done.status, "detail": done.detail})
            elif step.status == "running" and step.step_id in retrying:
                step = step.model_copy(update=retrying[step.step_id])
            steps.append(step)
        return current.model_copy(update={"steps": steps})

    async def _retries(self, handle: WorkflowHandle[Any, Any]) -> dict[str, dict[str, object]]:
        """Step id -> attempt, last failure and next attempt, for the steps being retried."""
        described = await handle.describe(rpc_timeout=CHILD_QUERY_TIMEOUT)
        found: dict[str, dict[str, object]] = {}
        for pending in described.raw_description.pending_activities:
            if not pending.HasField("last_failure"):
                continue
            error = await self.temporal.data_converter.decode_failure(pending.last_failure)
            found[pending.activity_id] = {
                "attempt": pending.attempt,
                "last_failure": failure_reason(error),
                "next_attempt_at": pending.next_attempt_schedule_time.ToDatetime(UTC)
                if pending.HasField("next_attempt_schedule_time")
                else None,
            }
        return found

    async def _raise_if_failed(self, handle: WorkflowHandle[Any, Any]) -> None:
        """RequestFailed, with the failure's reason, if the workflow ended without finishing."""
        described = await handle.describe()
        if described.status not in FAILED_STATES:
            return
        reason = described.status.name.lower() if described.status else "failed"
        try:
            await handle.result()
        except WorkflowFailureError as exc:
            reason = failure_reason(exc)
        raise RequestFailed(f"{handle.id} failed: {reason}")

    async def approve(self, workflow_id: str, decision: ApprovalDecision) -> None:
        """Approve an erasure waiting for the DPO."""
        await self._signal(workflow_id, ErasureWorkflow.approve, decision)

    async def reject(self, workflow_id: str, decision: ApprovalDecision) -> None:
        """Reject an erasure waiting for the DPO."""
        await self._signal(workflow_id, ErasureWorkflow.reject, decision)

    async def recheck(self, workflow_id: str) -> None:
        """Run a request's preflight again now, after its problems were fixed."""
        await self._signal(workflow_id, ErasureWorkflow.recheck)

    async def extend(self, workflow_id: str, extension: Extension) -> None:
        """Extend an erasure's Art. 12(3) deadline, with its reason."""
        await self._signal(workflow_id, ErasureWorkflow.extend, extension)

    async def result(self, workflow_id: str) -> Certificate:
        """Wait for an erasure to finish; its certificate."""
        handle = self.temporal.get_workflow_handle_for(ErasureWorkflow.run, workflow_id)
        return await handle.result()

    async def certificate(self, workflow_id: str) -> Certificate:
        """The certificate of a finished erasure (UnknownRequest while it still runs)."""
        handle = self.temporal.get_workflow_handle_for(ErasureWorkflow.run, workflow_id)
        described = await _described(handle)
        state = described.status
        if state == WorkflowExecutionStatus.RUNNING:
            raise UnknownRequest(
                f"{workflow_id} is still running: its certificate comes when it finishes "
                f"(`lethe status {workflow_id}`)"
            )
        if state != WorkflowExecutionStatus.COMPLETED:
            name = state.name.lower() if state else "unknown"
            raise UnknownRequest(f"{workflow_id} ended without a certificate ({name})")
        return await handle.result()

    async def retry(
        self, workflow_id: str, steps: Sequence[str] | None = None, *, by: str
    ) -> RetryStarted:
        """Re-run the failed steps (or the named ones, each of which must have failed) of a
        closed, `incomplete` erasure, under its original approval and window, as a new run of
        the same workflow id; `by` is the actor of its `erasure.retried` ledger entry.

        RetryRefused, saying why, for a request still running, rejected, or completed with no
        failed step, for a replay, and for a named step that did not fail or is not planned.
        """
        if workflow_id.startswith("replay-"):
            raise RetryRefused(_REPLAY_REFUSED.format(workflow_id=workflow_id))
        handle = self.temporal.get_workflow_handle(workflow_id)
        described = await _described(handle)
        if described.status == WorkflowExecutionStatus.RUNNING:
            raise RetryRefused(
                f"{workflow_id} is still running: only a closed request is retried, and a "
                f"running one retries by itself (`lethe status {workflow_id}`)"
            )
        run_id = described.run_id
        previous = await self._start_of(workflow_id, run_id)
        if previous.request.replay_of is not None:
            raise RetryRefused(_REPLAY_REFUSED.format(workflow_id=workflow_id))
        if described.status != WorkflowExecutionStatus.COMPLETED:
            # A retry that failed before touching anything (a step no longer planned): retry
            # from the certificate it retried.
            name = described.status.name.lower() if described.status else "unknown"
            if previous.request.retry_of is None:
                raise RetryRefused(
                    f"{workflow_id} ended without a certificate ({name}): there are no failed "
                    "steps to retry; a new request is `lethe erase`"
                )
            run_id = previous.request.retry_of.run_id
            previous = await self._start_of(workflow_id, run_id)
        certificate = await self.temporal.get_workflow_handle_for(
            ErasureWorkflow.run, workflow_id, run_id=run_id
        ).result(follow_runs=False)
        chosen = _steps_to_retry(workflow_id, certificate, steps)
        before = previous.request.retry_of
        if certificate.started_at is None:
            raise RetryRefused(f"{workflow_id} never started erasing: nothing to retry")
        retry_of = RetryOf(
            request_id=before.request_id if before else certificate.request_id,
            run_id=run_id,
            steps=chosen,
            approval=certificate.approval,
            started_at=before.started_at if before else certificate.started_at,
            deadline=certificate.deadline,
            extension=certificate.extension,
        )
        request = ErasureRequest(
            subject=previous.request.subject,
            region=previous.request.region,
            reason=f"retry of {retry_of.request_id}",
            requested_by=by,
            retry_of=retry_of,
        )
        start = ErasureStart(
            request_id=f"req-{uuid.uuid4().hex[:16]}",
            subject_ref=previous.subject_ref,
            request=request,
            received_at=previous.received_at,  # the original's: Art. 12(3) counts from it
        )
        try:
            await self.temporal.start_workflow(
                ErasureWorkflow.run,
                start,
                id=workflow_id,
                task_queue=self.settings.control_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                search_attributes=self._search_attributes(request, previous.subject_ref),
            )
        except WorkflowAlreadyStartedError:
            raise RetryRefused(
                f"a request for this subject started meanwhile: `lethe status {workflow_id}`"
            ) from None
        return RetryStarted(
            workflow_id=workflow_id,
            request_id=start.request_id,
            retry_of=retry_of.request_id,
            steps=chosen,
            approved_by=certificate.approval.by if certificate.approval else None,
        )

    async def _start_of(self, workflow_id: str, run_id: str | None) -> ErasureStart:
        """What one run of an erasure workflow was started with (decrypted)."""
        handle = self.temporal.get_workflow_handle(workflow_id, run_id=run_id)
        async for event in handle.fetch_history_events():
            started = event.workflow_execution_started_event_attributes
            decoded = await self.temporal.data_converter.decode(
                started.input.payloads, [ErasureStart]
            )
            found = decoded[0]
            if not isinstance(found, ErasureStart):
                break
            return found
        raise RetryRefused(f"{workflow_id} is not an erasure request: nothing to retry")

    async def forget_list(self) -> list[ForgetListEntry]:
        """The erased subjects, by reference."""
        return await forget_list.entries(await self._store())

    async def replay_forget_list(self, system: str, *, by: str) -> list[str]:
        """Re-apply every listed erasure to a restored system; the started workflow ids."""
        if self.settings.datamap is not None:
            known = {s.name for s in load_datamap(self.settings.datamap).systems}
            if system not in known:
                raise UnknownRequest(f"system {system[:60]!r} is not in the data map")
        listed = {e.subject_ref: e for e in await self.forget_list()}
        started = []
        for ref, subject in await forget_list.subjects(
            await self._store(), self.settings.subject_key_bytes
        ):
            request = ErasureRequest(
                subject=subject,
                reason=f"forget-list replay after a restore of {system}",
                requested_by=by,
                systems=[system],
                replay_of=listed[ref].request_id,
            )
            handle = await self.temporal.start_workflow(
                ErasureWorkflow.run,
                self._start(request, ref),
                id=f"replay-{ref}-{system}-{uuid.uuid4().hex[:8]}",
                task_queue=self.settings.control_queue,
                search_attributes=self._search_attributes(request, ref),
            )
            started.append(handle.id)
        return started

    async def place_hold(
        self,
        *,
        matter: str,
        scope: HoldScope,
        value: str,
        placed_by: str,
        reason: str,
        tenant: str | None = None,
    ) -> Hold:
        """Place a legal hold for `tenant` (None: all tenants; a tenant hold is its value's).
        For a subject hold, `value` is the subject reference."""
        return await holds.place(
            await self._store(),
            matter=matter,
            scope=scope,
            value=value,
            placed_by=placed_by,
            reason=reason,
            tenant=tenant,
        )

    async def release_hold(self, hold_id: str, *, released_by: str) -> Hold:
        """Release a hold and tell the erasures waiting on holds to check again."""
        hold = await holds.release(await self._store(), hold_id, released_by=released_by)
        # A bulk request is told whatever it is doing: a release while it erases a batch
        # must not be lost (its held subjects are looked at after the batch).
        # Only this deployment's (its control queue's); one that closed meanwhile is skipped.
        query = (
            "((LetheKind = 'erasure' AND LetheStatus = 'on_hold') OR LetheKind = 'erasure-bulk') "
            f"AND ExecutionStatus = 'Running' AND TaskQueue = '{self.settings.control_queue}'"
        )
        async for execution in self.temporal.list_workflows(query):
            with contextlib.suppress(UnknownRequest):
                await self._signal(execution.id, ErasureWorkflow.holds_changed)
        return hold

    async def list_holds(
        self, *, include_released: bool = False, tenant: str | None = None
    ) -> list[Hold]:
        """Legal holds, active ones unless asked, those placed for `tenant` only when given."""
        return await holds.list_holds(
            await self._store(), include_released=include_released, tenant=tenant
        )

    async def _store(self) -> AsyncEngine:
        return await engine_for(self.settings.store_url.get_secret_value())

    async def _signal(self, workflow_id: str, signal: Any, arg: object = None) -> None:
        handle = self.temporal.get_workflow_handle(workflow_id)
        try:
            if arg is None:
                await handle.signal(signal)
            else:
                await handle.signal(signal, arg)
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise UnknownRequest(f"no running erasure request {workflow_id}") from None
            raise

    @staticmethod
    def _start(request: ErasureRequest, ref: str) -> ErasureStart:
        return ErasureStart(
            request_id=f"req-{uuid.uuid4().hex[:16]}",
            subject_ref=ref,
            request=request,
            received_at=datetime.now(UTC),
        )

    @staticmethod
    def _search_attributes(request: ErasureRequest, ref: str) -> TypedSearchAttributes:
        return TypedSearchAttributes(
            [
                SearchAttributePair(sa.KIND, _kind(request)),
                SearchAttributePair(sa.STATUS, "planning"),
                SearchAttributePair(sa.TENANT, request.subject.tenant),
                SearchAttributePair(sa.SUBJECT_REF, ref),
            ]
        )


_REPLAY_REFUSED = (
    "{workflow_id} is a forget-list replay, not a request: replays are not retried; run "
    "`lethe forget-list replay --system SYSTEM` again"
)


def _steps_to_retry(
    workflow_id: str, certificate: Certificate, steps: Sequence[str] | None
) -> list[str]:
    """The certificate's failed steps, or the named ones (each planned, each failed)."""
    if certificate.outcome == "rejected":
        by = f" by {certificate.approval.by}" if certificate.approval else ""
        raise RetryRefused(
            f"{workflow_id} was rejected{by}: nothing was erased, so nothing is retried; a new "
            "request is `lethe erase`"
        )
    if certificate.outcome == "dry_run":
        raise RetryRefused(f"{workflow_id} was a dry run: nothing to retry")
    if certificate.outcome != "incomplete":
        raise RetryRefused(
            f"{workflow_id} completed {certificate.outcome}: no step failed, nothing to retry"
        )
    status = {outcome.step_id: outcome.status for outcome in certificate.steps}
    failed = [step.id for step in certificate.plan.steps if status.get(step.id) == "failed"]
    if not steps:
        if not failed:
            raise RetryRefused(
                f"{workflow_id} is {certificate.summary()[0]}, but no step failed: nothing to "
                "retry (a caveat clears by itself; `lethe certificate` says when)"
            )
        return failed
    planned = {step.id for step in certificate.plan.steps}
    unknown = [step for step in steps if step not in planned]
    if unknown:
        raise RetryRefused(
            f"step(s) {', '.join(s[:80] for s in unknown)} are not in the plan of "
            f"{certificate.request_id}; its steps are {', '.join(sorted(planned))}"
        )
    fine = [step for step in steps if step not in failed]
    if fine:
        shown = ", ".join(f"{step} ({status.get(step, 'not run')})" for step in fine)
        raise RetryRefused(
            f"step(s) {shown} did not fail: only failed steps are retried; the failed "
            f"ones are {', '.join(failed) or 'none'}"
        )
    return list(dict.fromkeys(steps))


def _kind(request: ErasureRequest) -> str:
    if request.dry_run:
        return "erasure-dry-run"
    return "erasure-replay" if request.replay_of else "erasure"


async def _described(handle: WorkflowHandle[Any, Any]) -> WorkflowExecutionDescription:
    """The workflow's description; UnknownRequest when there is no such workflow."""
    try:
        return await handle.describe()
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise UnknownRequest(f"no erasure request {handle.id}") from None
        raise
