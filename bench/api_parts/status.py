"""The status measurement's deployment: the erasure benchmark's sample systems with a policy
that asks for approval, a worker, requests left awaiting approval, DPO tokens, the two servers.

Each request is planned and stops at `awaiting_approval`: a running workflow whose status the
worker answers (a Temporal query), as a DPO's queue of pending requests is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import aiohttp

from bench import BenchError
from bench.erasure_parts.config import POLICY
from bench.erasure_parts.sample_data import TENANT, request_for
from bench.harness.timings import Segments
from lethe.evidence import tokens
from lethe.evidence.store import engine_for
from lethe.sdk.client import QUERY_TIMEOUT, Client
from lethe.workflows.erasure import ErasureWorkflow

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


async def _timed(count: int, call: Callable[[int], Awaitable[object]]) -> list[float]:
    """`count` calls one after another; each one's seconds."""
    found = []
    for index in range(count):
        started = time.perf_counter()
        await call(index)
        found.append(time.perf_counter() - started)
    return found


async def where_time_goes(
    base: str, token: str, client: Client, ids: list[str], count: int
) -> Segments:
    """One client, one request at a time: what each layer of a status read costs. Over HTTP the
    health route (framework, middleware), `/v1/me` (the same and the token's check) and the
    status; in this process the SDK's status (a Temporal query the worker answers, and a
    describe of the workflow) and each of its two calls alone."""
    segments = Segments(note=f"{count} calls each, one at a time, latency as the caller sees it")
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(base, headers=headers) as session:

        async def get(path: str) -> None:
            async with session.get(path) as answer:
                await answer.read()
                if answer.status != 200:
                    raise BenchError(f"GET {path.split('/')[2]} answered {answer.status}")

        calls: list[tuple[str, Callable[[int], Awaitable[object]]]] = [
            ("HTTP GET /v1/health (no sign-in)", lambda _: get("/v1/health")),
            ("HTTP GET /v1/me (the token checked)", lambda _: get("/v1/me")),
            ("HTTP GET /v1/erasures/{id}", lambda i: get(f"/v1/erasures/{ids[i % len(ids)]}")),
            ("SDK Client.status (query + describe)", lambda i: client.status(ids[i % len(ids)])),
            ("Temporal query alone", lambda i: _query(client, ids[i % len(ids)])),
            ("Temporal describe alone", lambda i: _describe(client, ids[i % len(ids)])),
        ]
        for name, call in calls:
            await _timed(max(count // 10, 3), call)  # warm
            for seconds in await _timed(count, call):
                segments.add(name, seconds)
    return segments


async def _query(client: Client, workflow_id: str) -> object:
    handle = client.temporal.get_workflow_handle_for(ErasureWorkflow.run, workflow_id)
    return await handle.query(ErasureWorkflow.status, rpc_timeout=QUERY_TIMEOUT)


async def _describe(client: Client, workflow_id: str) -> object:
    return await client.temporal.get_workflow_handle(workflow_id).describe()
