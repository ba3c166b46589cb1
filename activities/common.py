"""What every connector activity shares: the worker's region check, connections, typed errors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Protocol, TypeVar

from temporalio import activity

from lethe.activities.attempts import kept_alive
from lethe.contracts import Evidence, StepCheck, StepOutcome, StepRequest, VerifyRequest
from lethe.kernel.config import connection, current_settings
from lethe.kernel.errors import LetheError
from lethe.kernel.regions import deployment_prefix

T = TypeVar("T")


class WrongRegion(LetheError):
    """A worker was asked to touch a system outside its region."""


class SchemaMismatch(LetheError):
    """The data map names a table, column, topic or container that the live system lacks."""


class Eraser(Protocol):
    """What every connector offers: erase a step, and verify what erasing it did."""

    async def erase(self, request: StepRequest) -> StepOutcome:
        """Erase the subject's data in one locator; `running` until verified."""
        ...

    async def verify(self, request: StepRequest, erased: StepOutcome) -> StepOutcome:
        """Check the erasure held: `done`, or an honest other status."""
        ...

    async def preflight(self, request: StepRequest) -> list[str]:
        """Check, touching nothing, that the step could run now: the system answers, the
        credentials work, what the locator names exists with the permissions the step needs.
        Each problem in words (no personal data); empty when ready. Raise ServiceUnavailable
        when the system does not answer."""
        ...


async def erase_and_verify(eraser: Eraser, request: StepRequest) -> StepOutcome:
    """Erase, then verify at once: one activity a step (a retry repeats both; erase is
    idempotent)."""
    erased = await eraser.erase(request)
    if erased.status in ("retained", "failed"):
        return erased
    verified = await eraser.verify(request, erased)
    # The certificate keeps the evidence of both: what erasing did and what checking found.
    return verified.model_copy(
        update={
            "affected": erased.affected,
            "evidence": {**erased.evidence, **verified.evidence},
            "detail": "; ".join(d for d in (erased.detail, verified.detail) if d),
        }
    )


def connector_activities(
    kind: str, connector: Callable[[str], Eraser]
) -> tuple[
    Callable[[StepRequest], Awaitable[StepOutcome]],
    Callable[[VerifyRequest], Awaitable[StepOutcome]],
    Callable[[StepRequest], Awaitable[StepCheck]],
]:
    """The three activities of a connector kind: `<kind>.erase` (erase, then verify),
    `<kind>.verify` (verify again, e.g. a pending compaction) and `<kind>.preflight` (check,
    touching nothing). `connector` makes the connector for a connection string."""

    @activity.defn(name=f"{kind}.erase")
    async def erase(request: StepRequest) -> StepOutcome:
        return await guarded(
            request, lambda: erase_and_verify(connector(step_connection(request)), request)
        )

    @activity.defn(name=f"{kind}.verify")
    async def verify(check: VerifyRequest) -> StepOutcome:
        request = check.request
        return await guarded(
            request, lambda: connector(step_connection(request)).verify(request, check.erased)
        )

    @activity.defn(name=f"{kind}.preflight")
    async def preflight(request: StepRequest) -> StepCheck:
        return await checked(request, lambda: connector(step_connection(request)))

    erase.__doc__ = f"Erase one {kind} step of a subject, then verify it (this region only)."
    verify.__doc__ = f"Verify one {kind} step of a subject again."
    preflight.__doc__ = f"Check one {kind} step before anything is destroyed; touch nothing."
    return erase, verify, preflight


async def checked(request: StepRequest, connector: Callable[[], Eraser]) -> StepCheck:
    """A step's preflight: the connector's problems, or the error that stopped it as one (an
    unreachable system is `transient`). It never raises: the workflow decides what to do."""
    step_id = request.step.id
    try:
        check_region(request)
        async with kept_alive():
            problems = await connector().preflight(request)
    except LetheError as exc:
        return StepCheck(
            step_id=step_id, problems=[f"{type(exc).__name__}: {exc}"], transient=exc.retryable
        )
    return StepCheck(step_id=step_id, problems=problems)


def verdict(
    erased: StepOutcome,
    evidence: Evidence,
    problems: Sequence[str],
    done: str = "",
    *,
    gone_by: datetime | None = None,
) -> StepOutcome:
    """A verify call's outcome: `failed` with every problem in its detail, else `done` with
    `done`; verified either way, with the count of what the erase call touched."""
    return StepOutcome(
        step_id=erased.step_id,
        status="failed" if problems else "done",
        affected=erased.affected,
        verified=True,
        evidence=evidence,
        detail="; ".join(problems) if problems else done,
        gone_by=gone_by,
    )


def retained_outcome(request: StepRequest, why: str = "retained") -> StepOutcome:
    """The outcome of a `retain` step: nothing touched, the decisions' citations in `detail`."""
    reasons = [
        f"{d.citation} ({d.exception})" if d.exception else d.citation
        for d in request.step.decisions
    ]
    return StepOutcome(
        step_id=request.step.id,
        status="retained",
        detail=f"{why}: " + ("; ".join(dict.fromkeys(reasons)) or "no decision given"),
    )


def worker_region() -> str:
    """The region this activity's worker serves, from its deployment's task queue name."""
    prefix = deployment_prefix(current_settings().control_queue)
    return activity.info().task_queue.removeprefix(prefix)


def check_region(request: StepRequest) -> None:
    """Refuse a step whose system lives in another region than this worker's."""
    region = worker_region()
    if request.step.region != region:
        raise WrongRegion(
            f"system {request.step.system!r} is in region {request.step.region!r}; "
            f"this worker serves {region!r} and holds no credentials for it"
        )


def step_connection(request: StepRequest) -> str:
    """The connection string of the step's system, read from the variable the data map names."""
    return connection(request.step.connection).get_secret_value()


async def guarded(request: StepRequest, work: Callable[[], Awaitable[T]]) -> T:
    """Run a connector call for a step: region checked first, kept alive by heartbeats while it
    works, Lethe errors typed for Temporal."""
    try:
        check_region(request)
        async with kept_alive():
            return await work()
    except LetheError as exc:
        raise exc.to_application_error() from None
