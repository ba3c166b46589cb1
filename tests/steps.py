"""Step requests as the erasure workflow sends them to connectors, built one way for every test.

`step_request(step(locator))` asks to erase the default subject from one locator now; keyword
arguments change only what a test is about (the action, the subject, the window, ...). The step's
kind comes from its locator, and its phase from the kind, as planning decides them.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from lethe.classification.datamap import (
    DEFERRED_KINDS,
    BlobBackupLocator,
    KafkaTopicLocator,
    KeysLocator,
    Locator,
    LogLocator,
    RedisLocator,
    SqlTableLocator,
    SystemKind,
)
from lethe.contracts import Action, Decision, Phase, Step, StepRequest, Subject

TENANT = "st-mary"
SUBJECT_ID = "p-1"
REQUEST_ID = "req-1"
REGION = "eu"
WINDOW = timedelta(days=30)
"""The default erasure window (the policy packs' 30 days)."""

KINDS: dict[type[Locator], SystemKind] = {
    SqlTableLocator: "sql",
    KafkaTopicLocator: "kafka",
    RedisLocator: "redis",
    BlobBackupLocator: "blob",
    LogLocator: "logs",
    KeysLocator: "keys",
}
"""The kind of system each locator belongs to."""

SYSTEMS: dict[SystemKind, str] = {
    "sql": "patients-db",
    "kafka": "patient-events",
    "redis": "session-cache",
    "blob": "backups",
    "logs": "app-logs",
    "keys": "patient-keys",
}
"""The system a test's step belongs to unless it names one, by kind."""

CONNECTIONS: dict[SystemKind, str] = {
    "sql": "LETHE_STACK_SQL_URL",
    "kafka": "LETHE_STACK_KAFKA_BOOTSTRAP",
    "redis": "LETHE_STACK_REDIS_URL",
    "blob": "LETHE_STACK_BLOB_CONNECTION",
    "logs": "LETHE_STACK_BLOB_CONNECTION",
    "keys": "LETHE_KEYS_STORE_URL",
}
"""The variable holding the system's connection unless the test names one: the stack's."""


def decision(
    strategy: str,
    *,
    rule: str = "erasure-default",
    citation: str = "GDPR Art. 17(1)",
    category: str | None = None,
    exception: str | None = None,
) -> Decision:
    """The decision behind a step: the erasure default under GDPR Art. 17(1) unless overridden."""
    return Decision(
        rule=rule, category=category, strategy=strategy, citation=citation, exception=exception
    )


def step(
    locator: Locator,
    *,
    action: Action = "delete",
    system: str | None = None,
    index: int = 0,
    region: str = REGION,
    connection: str | None = None,
    phase: Phase | None = None,
    decisions: Sequence[Decision] | None = None,
    keep_columns: Sequence[str] = (),
    covers: Sequence[str] = (),
) -> Step:
    """One step of a plan for `locator`: `<system>/<index>`, the kind's system and connection."""
    kind = KINDS[type(locator)]
    system = system or SYSTEMS[kind]
    return Step(
        id=f"{system}/{index}",
        system=system,
        kind=kind,
        region=region,
        connection=connection or CONNECTIONS[kind],
        locator=locator,
        action=action,
        phase=phase or ("deferred" if kind in DEFERRED_KINDS else "immediate"),
        keep_columns=list(keep_columns),
        decisions=list(decisions) if decisions is not None else [decision(action)],
        covers=list(covers),
    )


def step_request(
    step: Step,
    *,
    subject: Subject | None = None,
    subject_ref: str | None = None,
    request_id: str = REQUEST_ID,
    started: datetime | None = None,
    window: timedelta = WINDOW,
    window_ends: datetime | None = None,
    subject_found: bool = True,
) -> StepRequest:
    """A request to erase `subject` (by default `p-1` of `st-mary`, under a fresh reference) in
    `step`, the erasure started now (or `started`) and its window ending `window` later."""
    started = started or datetime.now(UTC)
    return StepRequest(
        request_id=request_id,
        subject_ref=subject_ref or uuid.uuid4().hex,
        subject=subject or Subject(tenant=TENANT, subject_id=SUBJECT_ID),
        step=step,
        erasure_started_at=started,
        window_ends_at=window_ends or started + window,
        subject_found=subject_found,
    )
