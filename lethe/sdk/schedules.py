"""What Lethe's scheduled workflows (key rotation, retention sweeps) share: their Schedule,
created or updated in place, and finding their runs in visibility (a scheduled run's id carries
its start time, so only visibility finds it)."""

from __future__ import annotations

from datetime import datetime

from temporalio.client import Client as TemporalClient
from temporalio.client import (
    Schedule,
    ScheduleAlreadyRunningError,
    ScheduleUpdate,
    ScheduleUpdateInput,
    WorkflowExecution,
)
from temporalio.service import RPCError, RPCStatusCode


async def upsert_schedule(
    temporal: TemporalClient, schedule_id: str, schedule: Schedule
) -> tuple[bool, list[datetime]]:
    """Create the Schedule, or replace the one of that id; True if created, and the next run
    times."""
    created = True
    try:
        handle = await temporal.create_schedule(schedule_id, schedule)
    except ScheduleAlreadyRunningError:
        created = False
        handle = temporal.get_schedule_handle(schedule_id)

        def replace(_: ScheduleUpdateInput) -> ScheduleUpdate:
            return ScheduleUpdate(schedule=schedule)

        await handle.update(replace)
    described = await handle.describe()
    return created, list(described.info.next_action_times)


async def listed(temporal: TemporalClient, query: str, limit: int) -> list[WorkflowExecution]:
    """The workflows visibility lists for `query`, newest first; none from a server without
    Lethe's search attributes (or without visibility)."""
    try:
        return [execution async for execution in temporal.list_workflows(query, limit=limit)]
    except RPCError as exc:
        if exc.status in (RPCStatusCode.UNIMPLEMENTED, RPCStatusCode.INVALID_ARGUMENT):
            return []
        raise
