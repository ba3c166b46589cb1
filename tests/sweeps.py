"""Retention sweeps as the sweep workflow runs them, built one way for every connector's tests.

`planned_task(system, rules)` is the one task `plan_sweep` makes of a data map with one system
and a pack of rules; `sweep_task(locator, ...)` builds one by hand (its kind, system and
connection from `tests.steps`, as a step's). `sweep_batch(task, now)` is one batch of it;
`sweep_once` runs `<kind>.sweep` on the task's region's queue, `sweep_all` runs it again with
each result's cursor until one is done, as the workflow does. `term`, `hold` and `subject_hold`
make a task's rules and a batch's holds; `totals` sums results; `contents` reads a container.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from azure.storage.blob.aio import ContainerClient
from temporalio.testing import ActivityEnvironment

from lethe.activities.connectors import Connectors
from lethe.classification.datamap import DataMap, DateTrigger, Locator
from lethe.contracts import (
    Hold,
    HoldScope,
    RuleTerm,
    ScopeMatch,
    SweepBatch,
    SweepResult,
    SweepTask,
)
from lethe.kernel.config import current_settings
from lethe.kernel.regions import task_queue
from lethe.kernel.subjects import subject_ref
from lethe.plans.retention import plan_sweep
from lethe.policies.model import PolicyPack
from tests.steps import CONNECTIONS, REGION, TENANT, step

Cursor = list[str | int | float | None]


def unique(prefix: str) -> str:
    """`prefix` and 12 random hex digits: a name no other test uses."""
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def planned_task(system: Mapping[str, Any], rules: Sequence[Mapping[str, Any]]) -> SweepTask:
    """The one task `plan_sweep` makes of a data map with `system` (in region eu, its connection
    the stack's unless it names one; tenant st-mary) under a test pack of `rules`."""
    datamap = DataMap.model_validate(
        {
            "regions": [REGION],
            "tenants": {TENANT: {"region": REGION}},
            "systems": [
                {"region": REGION, "connection": CONNECTIONS[system["kind"]], **system},
            ],
        }
    )
    pack = PolicyPack.model_validate(
        {
            "name": "test",
            "version": "1",
            "erasure": {"default": {"citation": "GDPR Art. 17"}},
            "retention": list(rules),
        }
    )
    [task] = plan_sweep(datamap, pack).tasks
    assert task.kept is None
    return task


def term(
    kind: Literal["obligation", "limit"],
    period: timedelta,
    *,
    trigger: DateTrigger = "created",
    rule: str | None = None,
    category: str = "user",
) -> RuleTerm:
    """A retention rule as a task carries it: a limit deletes, an obligation keeps."""
    return RuleTerm(
        rule=rule or f"test.{kind}",
        category=category,
        kind=kind,
        period=period,
        trigger=trigger,
        action="delete" if kind == "limit" else None,
        citation="GDPR Art. 5(1)(e)" if kind == "limit" else "a test obligation",
    )


def sweep_task(
    locator: Locator,
    *,
    limit: RuleTerm,
    dates: Mapping[DateTrigger, str],
    obligations: Sequence[RuleTerm] = (),
    system: str | None = None,
    tenants: Sequence[str] = (TENANT,),
    scope: Sequence[ScopeMatch] = (),
    nulls: Literal["report", "delete"] = "report",
) -> SweepTask:
    """The task `<system>/0` over `locator` in region eu, of the system and connection
    `tests.steps.step` gives a step over it (its kind's, unless it names a system)."""
    where = step(locator, system=system).model_dump(
        include={"id", "system", "kind", "region", "connection"}
    )
    return SweepTask(
        **where,
        locator=locator,
        tenants=list(tenants),
        categories=list(locator.categories),
        scope=list(scope),
        limit=limit,
        obligations=list(obligations),
        dates=dict(dates),
        nulls=nulls,
    )


def hold(scope: HoldScope, value: str, *, released: bool = False) -> Hold:
    """A legal hold on `scope` = `value` placed now by the DPO (and released, `released`)."""
    at = datetime.now(UTC)
    return Hold(
        id=unique("hold-"),
        matter="litigation",
        scope=scope,
        value=value,
        placed_by="dpo@example.org",
        placed_at=at,
        released_by="dpo@example.org" if released else None,
        released_at=at if released else None,
    )


def subject_hold(tenant: str, subject_id: str) -> Hold:
    """A hold on one subject, by their reference under the settings' subject key."""
    return hold("subject", subject_ref(tenant, subject_id, current_settings().subject_key_bytes))


def sweep_batch(
    task: SweepTask,
    now: datetime,
    *,
    cursor: Cursor | None = None,
    batch_size: int = 100,
    holds: Sequence[Hold] = (),
    dry_run: bool = False,
    apply: bool = False,
    samples: int = 3,
    run_id: str | None = None,
) -> SweepBatch:
    """One batch of `task` as of `now`, in a run of its own unless `run_id` names one."""
    return SweepBatch(
        run_id=run_id or unique("sweep-"),
        task=task,
        now=now,
        cursor=cursor,
        batch_size=batch_size,
        holds=list(holds),
        dry_run=dry_run,
        apply=apply,
        samples=samples,
    )


def region_env(region: str = REGION) -> ActivityEnvironment:
    """An activity environment on the task queue of `region`'s worker."""
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        env.info, task_queue=task_queue(region, current_settings().control_queue)
    )
    return env


async def sweep_once(
    connectors: Connectors, batch: SweepBatch, *, env: ActivityEnvironment | None = None
) -> SweepResult:
    """One `<kind>.sweep` call, in `env` (by default on the task's region's queue)."""
    env = env or region_env(batch.task.region)
    result = await env.run(connectors.activity(f"{batch.task.kind}.sweep"), batch)
    assert isinstance(result, SweepResult)
    return result


async def sweep_all(
    connectors: Connectors,
    batch: SweepBatch,
    *,
    env: ActivityEnvironment | None = None,
    most: int = 50,
) -> list[SweepResult]:
    """Every call of the task, as the workflow makes them: on with each cursor until done (in
    fewer than `most` calls)."""
    results: list[SweepResult] = []
    while True:
        result = await sweep_once(connectors, batch, env=env)
        results.append(result)
        if result.done:
            assert result.cursor is None
            return results
        assert result.cursor is not None and result.cursor != batch.cursor
        assert len(results) < most
        batch = batch.model_copy(update={"cursor": result.cursor})


def totals(results: Sequence[SweepResult]) -> tuple[int, int, int]:
    """What the calls removed, held and found undated, summed."""
    return (
        sum(r.removed for r in results),
        sum(r.held for r in results),
        sum(r.undated for r in results),
    )


async def contents(container: ContainerClient) -> dict[str, bytes]:
    """Every blob of the container, by name."""
    return {
        b.name: await (await container.download_blob(b.name)).readall()
        async for b in container.list_blobs()
    }
