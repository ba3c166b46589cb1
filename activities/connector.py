"""The one base of every connector: what it is and can do, the steps it takes, how it runs.

A connector is a class per kind of system (SQL, Kafka, Redis, blob backups, logs, key stores)
with the same three calls: `preflight` (touching nothing), `erase` and `verify`. It describes
itself (`describe`), so the CLI and the docs list connectors from code. The base checks that a
step is one the connector takes (its kind, its locator model, an action it has) before any of
its code runs: one check and one `UnsupportedStep` for all. `retain` steps never reach a
connector; the regional workflow records them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Generic, Self, TypeVar, cast

from pydantic import BaseModel, ConfigDict

from lethe.activities.attempts import kept_alive
from lethe.activities.clients import Clients
from lethe.activities.common import check_region
from lethe.classification.datamap import DEFERRED_KINDS, SystemKind
from lethe.contracts import (
    Action,
    BatchStepOutcome,
    BatchStepRequest,
    Phase,
    StepCheck,
    StepOutcome,
    StepRequest,
    SweepBatch,
    SweepResult,
)
from lethe.kernel.errors import LetheError

L = TypeVar("L", bound=BaseModel)
T = TypeVar("T")


class UnsupportedStep(LetheError):
    """The step is not one this connector runs: another kind of system, another locator, or an
    action the connector does not have."""


class ConnectorInfo(BaseModel):
    """What a connector is and can do, as its code says: for `lethe connectors` and the docs."""

    model_config = ConfigDict(frozen=True)

    kind: SystemKind
    connector: str
    summary: str
    locator: str
    locator_fields: list[str]
    actions: list[Action]
    phase: Phase
    """When the erasure runs its steps: at once, or at the end of the erasure window."""
    batching: str
    """How a batch of subjects is erased (the same code erases one subject)."""
    preflight: str
    verify: str
    retry: str
    sweep: str


class Connector(ABC, Generic[L]):
    """The base of every connector: one kind of system, its locator model and its actions."""

    kind: ClassVar[SystemKind]
    locator_model: ClassVar[type[BaseModel]]
    actions: ClassVar[tuple[Action, ...]]
    batching: ClassVar[str] = ""
    """How `erase_batch` erases a batch of subjects in few round trips (bulk erasure); empty
    when the connector erases no batches."""
    checks: ClassVar[str]
    """What `preflight` checks, touching nothing."""
    proves: ClassVar[str]
    """What `verify` proves."""
    retries: ClassVar[str]
    """How a retry after a lost worker knows the first attempt's effect."""
    sweeps: ClassVar[str] = "no retention sweep"
    """What a retention sweep does in this kind of system (`sweep`)."""

    @classmethod
    @abstractmethod
    def open(cls, clients: Clients, connection: str) -> Self:
        """The connector for a system's connection string, over the worker's clients."""

    @abstractmethod
    async def erase(self, request: StepRequest) -> StepOutcome:
        """Erase the subject's data in one locator; `running` until verified."""

    @abstractmethod
    async def verify(self, request: StepRequest, erased: StepOutcome) -> StepOutcome:
        """Check the erasure held: `done`, or an honest other status."""

    @abstractmethod
    async def preflight(self, request: StepRequest) -> list[str]:
        """Check, touching nothing, that the step could run now: the system answers, the
        credentials work, what the locator names exists with the permissions the step needs.
        Each problem in words (no personal data); empty when ready. Raise ServiceUnavailable
        when the system does not answer."""

    async def erase_batch(self, batch: BatchStepRequest) -> BatchStepOutcome:
        """Erase one step for a batch of subjects in few round trips, then verify it: one
        outcome per subject, in the batch's order (`done` only when verified). A connector
        without `batching` refuses."""
        raise UnsupportedStep(f"the {self.kind} connector does not erase batches")

    async def verify_batch(
        self, batch: BatchStepRequest, erased: BatchStepOutcome
    ) -> BatchStepOutcome:
        """Check again what `erase_batch` did for a batch (a re-check, e.g. after compaction)."""
        raise UnsupportedStep(f"the {self.kind} connector does not verify batches")

    async def sweep(self, batch: SweepBatch) -> SweepResult:
        """One batch of a retention sweep over one task: remove (or, dry run, count) what is
        past its limit and outside every obligation and hold, and report drift; the next
        cursor, or `done`. A connector without a sweep refuses."""
        raise UnsupportedStep(f"the {self.kind} connector has no retention sweep")

    @classmethod
    def locator(cls, request: StepRequest | BatchStepRequest) -> L:
        """The step's locator, once the step is known to be one this connector takes; else
        UnsupportedStep (the one check of every connector)."""
        step = request.step
        if step.kind != cls.kind or not isinstance(step.locator, cls.locator_model):
            raise UnsupportedStep(
                f"step {step.id} is a {step.kind} step; the {cls.kind} connector does not run it"
            )
        if step.action == "retain":
            raise UnsupportedStep(
                f"step {step.id} is kept by policy (retain): the regional workflow records it, "
                "no connector runs it"
            )
        if step.action not in cls.actions:
            raise UnsupportedStep(
                f"{cls.kind} system {step.system!r}: {cls.kind} cannot {step.action!r}; use "
                + ", ".join(cls.actions)
            )
        return cast(L, step.locator)

    @classmethod
    def describe(cls) -> ConnectorInfo:
        """What this connector is and can do."""
        doc = (cls.__doc__ or "").strip()
        return ConnectorInfo(
            kind=cls.kind,
            connector=cls.__name__,
            summary=doc.splitlines()[0] if doc else "",
            locator=cls.locator_model.__name__,
            locator_fields=list(cls.locator_model.model_fields),
            actions=list(cls.actions),
            phase="deferred" if cls.kind in DEFERRED_KINDS else "immediate",
            batching=cls.batching or "no batches: one subject a call",
            preflight=cls.checks,
            verify=cls.proves,
            retry=cls.retries,
            sweep=cls.sweeps,
        )


async def erase_and_verify(connector: Connector[Any], request: StepRequest) -> StepOutcome:
    """Erase, then verify at once: one activity a step (a retry repeats both; erase is
    idempotent)."""
    erased = await connector.erase(request)
    if erased.status in ("retained", "failed"):
        return erased
    verified = await connector.verify(request, erased)
    # The certificate keeps the evidence of both: what erasing did and what checking found.
    return verified.model_copy(
        update={
            "affected": erased.affected,
            "evidence": {**erased.evidence, **verified.evidence},
            "detail": "; ".join(d for d in (erased.detail, verified.detail) if d),
        }
    )


async def guarded(system: str, region: str, work: Callable[[], Awaitable[T]]) -> T:
    """Run a connector call (a step's or a sweep batch's) on `system` in `region`: region
    checked first, kept alive by heartbeats while it works, Lethe errors typed for Temporal."""
    try:
        check_region(system, region)
        async with kept_alive():
            return await work()
    except LetheError as exc:
        raise exc.to_application_error() from None


async def checked(request: StepRequest, connector: Callable[[], Connector[Any]]) -> StepCheck:
    """A step's preflight: the connector's problems, or the error that stopped it as one (an
    unreachable system is `transient`). It never raises: the workflow decides what to do."""
    step_id = request.step.id
    try:
        check_region(request.step.system, request.step.region)
        async with kept_alive():
            problems = await connector().preflight(request)
    except LetheError as exc:
        return StepCheck(
            step_id=step_id, problems=[f"{type(exc).__name__}: {exc}"], transient=exc.retryable
        )
    return StepCheck(step_id=step_id, problems=problems)
