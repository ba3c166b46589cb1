"""Key rotation for services and the CLI: start or join a rotation, follow it, schedule it.

A rotation is the workflow `key-rotation` on the control queue: starting one while another runs
joins it (the one the schedule started too). Progress comes from the workflow's `progress`
query, which only a running control worker answers.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from temporalio.client import Client as TemporalClient
from temporalio.client import (
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleState,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError

from lethe.contracts import Contract
from lethe.kernel.config import Settings
from lethe.kernel.deadlines import format_duration
from lethe.kernel.errors import LetheError, failure_reason
from lethe.keys.rotation import (
    KIND,
    RotationProgress,
    RotationRequest,
    RotationResult,
    rotation_schedule_id,
    rotation_workflow_id,
)
from lethe.keys.service import KeyStatus, open_key_service
from lethe.sdk.client import answer
from lethe.sdk.schedules import listed, upsert_schedule
from lethe.temporal import search_attributes as sa
from lethe.workflows.key_rotation import KeyRotationWorkflow

QUERY_TIMEOUT = timedelta(seconds=12)
"""Longer than the sticky-queue timeout (10 s), so a query right after a worker crash answers."""


class UnknownRotation(LetheError):
    """No key rotation runs (or ran) under the id asked for."""


class RotationFailed(LetheError):
    """A key rotation ended without finishing (it failed, timed out, or was terminated)."""


async def running_rotation(temporal: TemporalClient, control_queue: str) -> str | None:
    """The workflow id of the rotation running on this control queue, if visibility lists one
    (a scheduled rotation's id carries its start time, so only visibility finds it)."""
    query = (
        f"{sa.KIND.name} = '{KIND}' AND TaskQueue = '{control_queue}' "
        "AND ExecutionStatus = 'Running'"
    )
    # Without visibility nothing is found, and the fixed id still joins.
    found = [execution.id for execution in await listed(temporal, query, limit=10)]
    fixed = rotation_workflow_id(control_queue)
    return fixed if fixed in found else (found[0] if found else None)


async def start_rotation(
    temporal: TemporalClient, control_queue: str, request: RotationRequest
) -> tuple[WorkflowHandle[KeyRotationWorkflow, RotationResult], bool]:
    """Start a key rotation, or join the one running; its handle, and True if it joined."""
    running = await running_rotation(temporal, control_queue)
    if running is not None:
        return temporal.get_workflow_handle_for(KeyRotationWorkflow.run, running), True
    workflow_id = rotation_workflow_id(control_queue)
    try:
        # FAIL rather than USE_EXISTING: the error says, unlike a joined start, that it joined.
        handle = await temporal.start_workflow(
            KeyRotationWorkflow.run,
            request,
            id=workflow_id,
            task_queue=control_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            search_attributes=TypedSearchAttributes([SearchAttributePair(sa.KIND, KIND)]),
        )
    except WorkflowAlreadyStartedError:
        return temporal.get_workflow_handle_for(KeyRotationWorkflow.run, workflow_id), True
    return handle, False


async def rotation_progress(
    temporal: TemporalClient, workflow_id: str, timeout: timedelta = QUERY_TIMEOUT
) -> RotationProgress:
    """The rotation's `progress` query; ServiceUnavailable when no control worker answers."""
    handle = temporal.get_workflow_handle_for(KeyRotationWorkflow.run, workflow_id)
    return await answer(
        handle.query(KeyRotationWorkflow.progress, rpc_timeout=timeout),
        what=f"the progress of {workflow_id}",
        unknown=UnknownRotation(f"no key rotation {workflow_id}"),
    )


async def rotation_ended(temporal: TemporalClient, workflow_id: str) -> bool:
    """True if the rotation completed; RotationFailed if it ended any other way."""
    handle = temporal.get_workflow_handle(workflow_id)
    described = await handle.describe()
    if described.status in (None, WorkflowExecutionStatus.RUNNING):
        return False
    if described.status == WorkflowExecutionStatus.COMPLETED:
        return True
    reason = described.status.name.lower()
    try:
        await handle.result()
    except WorkflowFailureError as exc:
        reason = failure_reason(exc)
    raise RotationFailed(f"{workflow_id} ended without finishing: {reason}")


async def schedule_rotation(
    temporal: TemporalClient, control_queue: str, every: timedelta, request: RotationRequest
) -> tuple[str, bool, list[datetime]]:
    """Create or update the rotation's Schedule; its id, True if created, the next run times."""
    schedule_id = rotation_schedule_id(control_queue)
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            KeyRotationWorkflow.run,
            request,
            id=rotation_workflow_id(control_queue),
            task_queue=control_queue,
            typed_search_attributes=TypedSearchAttributes([SearchAttributePair(sa.KIND, KIND)]),
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=every)]),
        # A rotation still in its grace period when the next one is due: skip the next one.
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
        state=ScheduleState(
            note=f"KEK rotation every {format_duration(every)}, set by {request.requested_by}"
        ),
    )
    created, upcoming = await upsert_schedule(temporal, schedule_id, schedule)
    return schedule_id, created, upcoming


class KeysReport(Contract):
    """The key service's state and the rotation's progress (`lethe keys status`, the API)."""

    keys: KeyStatus
    rotation: RotationProgress | None = None
    rotation_note: str = ""
    """Why no progress is shown: no rotation runs, or no worker answered."""


async def keys_report(temporal: TemporalClient, settings: Settings) -> KeysReport:
    """KEK versions, data keys per version, shredded subjects, and the running rotation."""
    keys = await (await open_key_service(settings)).status()
    rotation, note = None, ""
    try:
        workflow_id = await running_rotation(temporal, settings.control_queue)
        if workflow_id is None:
            note = "no key rotation is running"
        else:
            rotation = await rotation_progress(temporal, workflow_id)
    except LetheError as exc:
        note = str(exc)
    return KeysReport(keys=keys, rotation=rotation, rotation_note=note)
