"""What connectors share besides their base: the worker's region check, the step's connection,
verdicts, and the errors every kind raises."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from temporalio import activity

from lethe.contracts import BatchStepRequest, Evidence, StepOutcome, StepRequest
from lethe.kernel.config import connection, current_settings
from lethe.kernel.errors import LetheError
from lethe.kernel.regions import deployment_prefix


class WrongRegion(LetheError):
    """A worker was asked to touch a system outside its region."""


class SchemaMismatch(LetheError):
    """The data map names a table, column, topic or container that the live system lacks."""


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


def check_region(system: str, region: str) -> None:
    """Refuse work on `system`, which lives in `region`, unless this worker serves that region."""
    served = worker_region()
    if region != served:
        raise WrongRegion(
            f"system {system!r} is in region {region!r}; "
            f"this worker serves {served!r} and holds no credentials for it"
        )


def step_connection(request: StepRequest | BatchStepRequest) -> str:
    """The connection string of the step's system, read from the variable the data map names."""
    return connection(request.step.connection).get_secret_value()
