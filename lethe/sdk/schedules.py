"""Temporal Schedules Lethe keeps (key rotation, retention sweeps): created, or updated in
place when one of that id exists."""

from __future__ import annotations

from datetime import datetime

from temporalio.client import Client as TemporalClient
from temporalio.client import (
    Schedule,
    ScheduleAlreadyRunningError,
    ScheduleUpdate,
    ScheduleUpdateInput,
)


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
