"""The status measurement's deployment: the erasure benchmark's sample systems with a policy
that asks for approval, a worker, requests left awaiting approval, DPO tokens, the two servers.

Each request is planned and stops at `awaiting_approval`: a running workflow whose status the
worker answers (a Temporal query), as a DPO's queue of pending requests is.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path

from bench import BenchError
from bench.erasure_parts.config import POLICY
from bench.erasure_parts.sample_data import TENANT, request_for
from lethe.evidence import tokens
from lethe.evidence.store import engine_for
from lethe.sdk.client import Client

APPROVAL_OFF = "approval: {always: false, special_category: false}"
APPROVAL_ON = "approval: {always: true, special_category: false}"
WAIT_SECONDS = 60.0


def write_policy(folder: Path) -> Path:
    """The erasure benchmark's policy pack, asking for approval of every request."""
    text = POLICY.read_text()
    if APPROVAL_OFF not in text:
        raise BenchError(f"{POLICY} no longer has the approval line this benchmark turns on")
    pack = folder / "policy.yaml"
    pack.write_text(text.replace(APPROVAL_OFF, APPROVAL_ON))
    return pack


async def awaiting_approval(client: Client, subjects: list[str]) -> list[str]:
    """Submit an erasure of each subject and wait until each awaits approval; their ids."""
    ids = [(await client.erase(request_for(subject))).workflow_id for subject in subjects]
    deadline = time.monotonic() + WAIT_SECONDS
    waiting = set(ids)
    while waiting:
        for workflow_id in sorted(waiting):
            if (await client.status(workflow_id)).state == "awaiting_approval":
                waiting.discard(workflow_id)
        if waiting and time.monotonic() > deadline:
            raise BenchError(f"{len(waiting)} requests did not reach awaiting_approval in time")
        await asyncio.sleep(0.2)
    return ids


async def dpo_tokens(store_url: str, count: int) -> list[str]:
    """`count` DPO tokens of the benchmark's tenant (one a client), in the run's store."""
    store = await engine_for(store_url)
    made = []
    for index in range(count):
        _, secret = await tokens.create(
            store,
            name=f"bench-dpo-{index}",
            role="dpo",
            tenant=TENANT,
            lifetime=timedelta(hours=2),
            created_by="bench",
        )
        made.append(secret)
    return made
