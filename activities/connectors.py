"""A worker's connectors: every kind, registered once, over clients the worker owns.

`Connectors` is the object a region's worker makes at start over its `Clients`, which it closes
when it stops (as in temporalio/samples-python `hello_activity_method`): its activities
(`<kind>.erase`, `<kind>.verify`, `<kind>.preflight`, `<kind>.erase_batch`, `<kind>.sweep` for
each kind, `<kind>.subjects` for the kinds that list a tenant's subjects, and
`region.preflight`, which checks several steps of the region at once) share those clients, and
no client outlives the worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from temporalio import activity

from lethe.activities.blob import BackupEraser
from lethe.activities.cache import CacheEraser
from lethe.activities.cache_subjects import redis_subjects
from lethe.activities.clients import Clients
from lethe.activities.common import step_connection
from lethe.activities.connector import (
    Connector,
    ConnectorInfo,
    UnsupportedStep,
    checked,
    erase_and_verify,
    guarded,
)
from lethe.activities.kafka import TombstoneWriter
from lethe.activities.logs import LogRedactor
from lethe.activities.shred import KeyShredder
from lethe.activities.sql import SqlEraser
from lethe.activities.sql_subjects import sql_subjects
from lethe.contracts import (
    BatchStepOutcome,
    BatchStepRequest,
    StepCheck,
    StepOutcome,
    StepRequest,
    SubjectsPage,
    SubjectsQuery,
    SweepBatch,
    SweepResult,
    VerifyBatch,
    VerifyRequest,
)
from lethe.kernel.config import connection

KINDS: tuple[type[Connector[Any]], ...] = (
    SqlEraser,
    TombstoneWriter,
    CacheEraser,
    BackupEraser,
    LogRedactor,
    KeyShredder,
)
"""Every connector, one per kind of system the data map knows."""
BY_KIND: dict[str, type[Connector[Any]]] = {kind.kind: kind for kind in KINDS}


SubjectLister = Callable[[Clients, SubjectsQuery], Awaitable[SubjectsPage]]
SUBJECT_LISTS: dict[str, SubjectLister] = {"sql": sql_subjects, "redis": redis_subjects}
"""Kinds whose connectors list a tenant's subjects (`<kind>.subjects`, tenant offboarding)."""


def describe() -> list[ConnectorInfo]:
    """What each connector is and can do, from its code."""
    return [kind.describe() for kind in KINDS]


class Connectors:
    """One worker's connectors: the activities of every kind, over the worker's clients (which
    the worker opens and closes)."""

    def __init__(self, clients: Clients) -> None:
        """Over `clients`."""
        self.clients = clients
        self._activities: dict[str, Callable[..., Awaitable[Any]]] = {}
        for kind in KINDS:
            self._activities.update(self._activities_of(kind))
        for name, lister in SUBJECT_LISTS.items():
            self._activities[f"{name}.subjects"] = self._subjects_of(name, lister)
        self._activities["region.preflight"] = self._region_preflight()

    def activities(self) -> Sequence[Callable[..., Awaitable[Any]]]:
        """Every connector activity, for a region's worker."""
        return list(self._activities.values())

    def activity(self, name: str) -> Callable[..., Awaitable[Any]]:
        """One activity by its name (`sql.erase`)."""
        return self._activities[name]

    def connector(
        self, kind: type[Connector[Any]], request: StepRequest | BatchStepRequest
    ) -> Connector[Any]:
        """The connector for a step's system, over this worker's clients."""
        kind.locator(request)  # refuse a step of another kind before reading its connection
        return kind.open(self.clients, step_connection(request))

    def _region_preflight(self) -> Callable[..., Awaitable[Any]]:
        @activity.defn(name="region.preflight")
        async def region_preflight(requests: list[StepRequest]) -> list[StepCheck]:
            checks = (checked(r, self._connector_of(r)) for r in requests)
            return list(await asyncio.gather(*checks))

        region_preflight.__doc__ = (
            "Check several steps of this region at once (each as `<kind>.preflight` would), "
            "touching nothing: one activity for a request's share of the region."
        )
        return region_preflight

    def _connector_of(self, request: StepRequest) -> Callable[[], Connector[Any]]:
        return lambda: self.connector(BY_KIND[request.step.kind], request)

    def _subjects_of(self, name: str, lister: SubjectLister) -> Callable[..., Awaitable[Any]]:
        @activity.defn(name=f"{name}.subjects")
        async def subjects(query: SubjectsQuery) -> SubjectsPage:
            step = query.step
            return await guarded(step.system, step.region, lambda: lister(self.clients, query))

        subjects.__doc__ = f"One page of a tenant's subjects in one {name} step (reading only)."
        return subjects

    def _activities_of(
        self, kind: type[Connector[Any]]
    ) -> dict[str, Callable[..., Awaitable[Any]]]:
        name = kind.kind

        @activity.defn(name=f"{name}.erase")
        async def erase(request: StepRequest) -> StepOutcome:
            step = request.step
            return await guarded(
                step.system,
                step.region,
                lambda: erase_and_verify(self.connector(kind, request), request),
            )

        @activity.defn(name=f"{name}.verify")
        async def verify(check: VerifyRequest) -> StepOutcome:
            request = check.request
            return await guarded(
                request.step.system,
                request.step.region,
                lambda: self.connector(kind, request).verify(request, check.erased),
            )

        @activity.defn(name=f"{name}.preflight")
        async def preflight(request: StepRequest) -> StepCheck:
            return await checked(request, lambda: self.connector(kind, request))

        @activity.defn(name=f"{name}.erase_batch")
        async def erase_batch(batch: BatchStepRequest) -> BatchStepOutcome:
            step = batch.step
            return await guarded(
                step.system, step.region, lambda: self.connector(kind, batch).erase_batch(batch)
            )

        @activity.defn(name=f"{name}.verify_batch")
        async def verify_batch(check: VerifyBatch) -> BatchStepOutcome:
            batch = check.request
            step = batch.step
            return await guarded(
                step.system,
                step.region,
                lambda: self.connector(kind, batch).verify_batch(batch, check.erased),
            )

        @activity.defn(name=f"{name}.sweep")
        async def sweep(batch: SweepBatch) -> SweepResult:
            task = batch.task

            async def one_batch() -> SweepResult:
                if task.kind != name:
                    raise UnsupportedStep(
                        f"task {task.id} is a {task.kind} task; the {name} sweep does not run it"
                    )
                secret = connection(task.connection).get_secret_value()
                return await kind.open(self.clients, secret).sweep(batch)

            return await guarded(task.system, task.region, one_batch)

        erase.__doc__ = f"Erase one {name} step of a subject, then verify it (this region only)."
        verify.__doc__ = f"Verify one {name} step of a subject again."
        preflight.__doc__ = f"Check one {name} step before anything is destroyed; touch nothing."
        erase_batch.__doc__ = f"Erase, then verify, one {name} step for a batch of subjects."
        verify_batch.__doc__ = f"Verify again one {name} step of a batch (after the window)."
        sweep.__doc__ = f"One batch of a retention sweep over one {name} task (this region only)."
        return {
            f"{name}.erase": erase,
            f"{name}.verify": verify,
            f"{name}.preflight": preflight,
            f"{name}.erase_batch": erase_batch,
            f"{name}.verify_batch": verify_batch,
            f"{name}.sweep": sweep,
        }
