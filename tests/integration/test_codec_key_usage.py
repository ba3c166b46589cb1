"""A codec key retires only when no open workflow needs it: the usage scan on the real server."""

from __future__ import annotations

import asyncio
import uuid

from temporalio.client import Client as TemporalClient

from lethe.codec.keys import CodecKeyRing
from lethe.contracts import HealthCheckRequest
from lethe.kernel.config import Settings
from lethe.keys.store import key_engine
from lethe.temporal.codec_usage import KeyUsage, open_workflow_key_usage
from lethe.workflows.healthcheck import HealthCheckWorkflow


async def scan_until(client: TemporalClient, workflow_id: str, visible: bool) -> KeyUsage:
    """Scan until the workflow is (or is no longer) listed: visibility lags a little."""
    for _ in range(100):
        usage = await open_workflow_key_usage(client)
        listed = any(workflow_id in ids for ids in usage.workflows_by_key.values())
        if listed == visible:
            return usage
        await asyncio.sleep(0.1)
    raise AssertionError(f"{workflow_id} was {'never' if visible else 'still'} listed as open")


async def test_an_open_workflow_pins_the_key_its_history_uses(
    stack_temporal: TemporalClient, settings: Settings
) -> None:
    workflow_id = f"codec-usage-{uuid.uuid4().hex}"
    handle = await stack_temporal.start_workflow(
        HealthCheckWorkflow.run,
        HealthCheckRequest(token="usage"),
        id=workflow_id,
        task_queue=f"nobody-polls-{uuid.uuid4().hex[:8]}",
    )
    try:
        engine = await key_engine(settings.key_store_url)
        rotated = await CodecKeyRing(engine, settings.keys_master_key_bytes).rotate()
        usage = await scan_until(stack_temporal, workflow_id, visible=True)
        [pinned] = [key for key, ids in usage.workflows_by_key.items() if workflow_id in ids]
        assert pinned != rotated
        assert usage.scanned >= 1
    finally:
        await handle.terminate("test over")
    await scan_until(stack_temporal, workflow_id, visible=False)
