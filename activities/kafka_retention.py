"""Kafka retention sweeps: a topic's retention settings against the rules for its categories.

Kafka removes a topic's records by itself, by age for the whole topic, so a sweep removes
nothing: it reads `retention.ms`, `cleanup.policy`, `max.compaction.lag.ms` and
`delete.retention.ms` and reports each that breaks a rule (`topic_drift`). A limit (keep at
most P) needs records deleted by age within P, and on a compacted topic superseded records and
tombstones gone within P; an obligation (keep at least O) needs a retention of O or more, or
none. Where both apply the obligation wins. Kafka dates records by their timestamp only, so a
rule counting from `closed` or `last_activity` is honoured only conservatively: an obligation
by keeping the records for ever, a limit (which then cannot be checked) is reported, never
changed.

With `apply`, the drifted settings change in one `incremental_alter_configs` call and are read
back: each drift the topic now meets is `fixed`. A change that removes records sooner (a limit's)
is not made while a legal hold bears on the task: the topic removes every subject's records
alike. Compaction is never given up: `compact` becomes `compact,delete`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ResourceType,
)

from lethe.activities.common import SchemaMismatch
from lethe.activities.connector import UnsupportedStep
from lethe.activities.driver_errors import DriverRefused, lethe_error
from lethe.activities.sweeps import SweepHolds, sweep_holds
from lethe.classification.datamap import KafkaTopicLocator
from lethe.contracts import Drift, RuleTerm, SweepBatch, SweepResult, SweepTask
from lethe.kernel.deadlines import format_duration
from lethe.kernel.errors import LetheError, ServiceUnavailable

SETTINGS = ("retention.ms", "cleanup.policy", "max.compaction.lag.ms", "delete.retention.ms")
"""The topic settings a sweep compares with the rules."""
DEFAULTS = {
    "retention.ms": "604800000",
    "cleanup.policy": "delete",
    "max.compaction.lag.ms": "9223372036854775807",
    "delete.retention.ms": "86400000",
}
"""Kafka's values for a setting nobody set (the broker reports them; these stand in if not)."""
FOREVER = -1
"""`retention.ms=-1`: records are kept for ever."""
REFUSALS = (
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.INVALID_CONFIG,
    KafkaError.POLICY_VIOLATION,
    KafkaError.INVALID_REQUEST,
)
"""Broker answers to a change that retrying will not alter."""
READ_BACK_SECONDS = 5.0
"""How long a changed topic is read again until it shows the change."""
Report = Callable[[str, str, str, str | None, bool], None]
"""Records one drift: (setting, wanted, breaks, value to set or None, removes sooner)."""


@dataclass(frozen=True)
class Change:
    """One drifted setting, and what `apply` sets it to."""

    drift: Drift
    value: str | None
    """The value to set; None: reported only (nothing a topic can set honours the rule)."""
    sooner: bool = False
    """Setting it removes records sooner (a limit's change): not made under a legal hold."""


# --- the comparison (pure) ---------------------------------------------------------------------


def _ms(period: timedelta) -> int:
    return period // timedelta(milliseconds=1)


def _period(term: RuleTerm) -> str:
    return format_duration(term.period, years=True)


def _shown(milliseconds: int) -> str:
    if milliseconds < 0:
        return "for ever"
    if milliseconds >= _ms(timedelta.max):  # Long.MAX_VALUE: no bound at all
        return "without bound"
    return format_duration(timedelta(milliseconds=milliseconds), years=True)


def policies(value: str) -> set[str]:
    """The parts of a `cleanup.policy` value (`compact,delete` -> {compact, delete})."""
    return {part.strip() for part in value.split(",") if part.strip()}


def widened(value: str) -> str:
    """`cleanup.policy` that also deletes by age, keeping compaction where the topic has it."""
    return "compact,delete" if "compact" in policies(value) else "delete"


def topic_drift(
    topic: str,
    found: Mapping[str, str],
    limit: RuleTerm | None,
    obligations: Sequence[RuleTerm],
) -> list[Change]:
    """Each setting of `topic` (`found`, as the broker reports them) that breaks the limit or
    an obligation, with the value that honours it."""
    settings = {name: found.get(name, DEFAULTS[name]) for name in SETTINGS}
    policy = settings["cleanup.policy"]
    retention = int(settings["retention.ms"])
    undatable = [term for term in obligations if term.trigger != "created"]
    dated = [term for term in obligations if term.trigger == "created"]
    longest = max(dated, key=lambda term: term.period, default=None)
    changes: list[Change] = []

    def drift(setting: str, wanted: str, breaks: str, value: str | None, sooner: bool) -> None:
        changes.append(
            Change(
                Drift(
                    target=topic,
                    setting=setting,
                    found=settings[setting],
                    wanted=wanted,
                    breaks=breaks,
                ),
                value,
                sooner,
            )
        )

    if undatable:
        term = undatable[0]
        if "delete" in policies(policy) and retention != FOREVER:
            drift(
                "retention.ms",
                str(FOREVER),
                f"{term.rule}: keeps records {_period(term)} from {term.trigger}, which a "
                f"topic cannot date (Kafka dates records by their timestamp), so only keeping "
                f"them for ever honours it; retention.ms={retention} deletes them after "
                f"{_shown(retention)}",
                str(FOREVER),
                False,
            )
    # A limit that is enforced makes the topic delete by age even where it does not yet.
    deletes = "delete" in policies(policy) or (limit is not None and limit.trigger == "created")
    if not undatable and longest is not None and deletes and 0 <= retention < _ms(longest.period):
        wanted = max(_ms(longest.period), _ms(limit.period) if limit else 0)
        drift(
            "retention.ms",
            str(wanted),
            f"{longest.rule}: kept {_shown(retention)}, shorter than the "
            f"{_period(longest)} it must be kept",
            str(wanted),
            False,
        )
    if limit is not None:
        _limit_drift(drift, settings, limit, undatable, longest)
    return changes


def _limit_drift(
    drift: Report,
    settings: Mapping[str, str],
    limit: RuleTerm,
    undatable: Sequence[RuleTerm],
    longest: RuleTerm | None,
) -> None:
    """The limit's drift, through `drift(setting, wanted, breaks, value, sooner)`."""
    limit_ms = _ms(limit.period)
    # The obligation wins over the limit: records are kept as long as the longest says.
    kept_ms = max(limit_ms, _ms(longest.period)) if longest else limit_ms
    checkable = limit.trigger == "created"
    note = (
        ""
        if checkable
        else f" (the limit counts from {limit.trigger}, which a topic cannot date: Kafka dates "
        f"records by their timestamp, so it cannot be checked; {_shown(limit_ms)} from the "
        "timestamp honours it for sure)"
    )

    def limited(setting: str, wanted: str, how: str) -> None:
        drift(setting, wanted, f"{limit.rule}: {how}{note}", wanted if checkable else None, True)

    policy = settings["cleanup.policy"]
    if not undatable:
        if "delete" not in policies(policy):
            limited(
                "cleanup.policy",
                widened(policy),
                f"cleanup.policy={policy} deletes nothing by age, so records are kept longer "
                f"than {_period(limit)}",
            )
        retention = int(settings["retention.ms"])
        if retention < 0 or retention > kept_ms:
            limited(
                "retention.ms",
                str(kept_ms),
                f"kept {_shown(retention)}, longer than {_shown(kept_ms)}",
            )
    if "compact" in policies(policy):
        for setting, what in (
            ("max.compaction.lag.ms", "superseded records are kept up to"),
            ("delete.retention.ms", "tombstones are kept"),
        ):
            value = int(settings[setting])
            if value < 0 or value > limit_ms:
                limited(
                    setting,
                    str(limit_ms),
                    f"{what} {_shown(value)}, longer than {_period(limit)}",
                )


# --- the sweep -----------------------------------------------------------------------------------


class TopicRetention:
    """Compares one cluster's topics with retention rules and, asked to, changes them."""

    def __init__(self, admin: AdminClient, bootstrap: str, timeout: float) -> None:
        """Over the worker's admin client of the cluster at `bootstrap`; each broker call may
        take `timeout` seconds."""
        self._admin, self._bootstrap, self._timeout = admin, bootstrap, timeout

    async def sweep(self, batch: SweepBatch) -> SweepResult:
        """The task's topic against its rules: its drift, changed with `apply` (one call)."""
        task = batch.task
        locator = task.locator
        if not isinstance(locator, KafkaTopicLocator):
            raise UnsupportedStep(f"task {task.id} names no Kafka topic")
        topic = locator.topic
        found = await self._settings(task, topic)
        changes = topic_drift(topic, found, task.limit, task.obligations)
        if not (batch.apply and not batch.dry_run and changes):
            return SweepResult(task_id=task.id, done=True, drift=[c.drift for c in changes])
        holds = sweep_holds(task, batch.holds)
        settable = [c for c in changes if c.value is not None]
        made = [c for c in settable if not (c.sooner and holds.any)]
        detail = _held_detail(holds) if len(made) < len(settable) else ""
        if made:
            await self._alter(task, topic, {c.drift.setting: str(c.value) for c in made})
            now = await self._read_back(task, topic, made)
            changes = [_fixed(c, now) if c in made else c for c in changes]
        return SweepResult(
            task_id=task.id, done=True, drift=[c.drift for c in changes], detail=detail
        )

    async def _settings(self, task: SweepTask, topic: str) -> dict[str, str]:
        """The topic's retention settings; SchemaMismatch if the broker has no such topic."""
        resource = ConfigResource(ResourceType.TOPIC, topic)
        try:
            futures = self._admin.describe_configs([resource], request_timeout=self._timeout)
            entries = await self._result(next(iter(futures.values())))
        except KafkaException as exc:
            raise self._error(task, topic, exc) from None
        return {
            name: entry.value
            for name, entry in entries.items()
            if name in SETTINGS and entry.value is not None
        }

    async def _read_back(
        self, task: SweepTask, topic: str, made: Sequence[Change]
    ) -> dict[str, str]:
        """The settings after a change: a broker serves a change it accepted a moment later, so
        they are read again until they show it, for up to `READ_BACK_SECONDS`."""
        deadline = time.monotonic() + READ_BACK_SECONDS
        while True:
            now = await self._settings(task, topic)
            if all(_fixed(c, now).drift.fixed for c in made) or time.monotonic() > deadline:
                return now
            await asyncio.sleep(0.2)

    async def _alter(self, task: SweepTask, topic: str, values: Mapping[str, str]) -> None:
        resource = ConfigResource(
            ResourceType.TOPIC,
            topic,
            incremental_configs=[
                ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)
                for name, value in values.items()
            ],
        )
        try:
            futures = self._admin.incremental_alter_configs(
                [resource], request_timeout=self._timeout
            )
            await self._result(next(iter(futures.values())))
        except KafkaException as exc:
            raise self._error(task, topic, exc, changing=True) from None

    async def _result(self, future: Any) -> Any:
        try:
            async with asyncio.timeout(self._timeout + 1):
                return await asyncio.wrap_future(future)
        except TimeoutError:
            raise ServiceUnavailable(f"Kafka at {self._bootstrap}: TimeoutError") from None

    def _error(
        self, task: SweepTask, topic: str, exc: KafkaException, *, changing: bool = False
    ) -> LetheError:
        """SchemaMismatch for a topic the broker lacks; DriverRefused for a change it refuses;
        else the cluster is unavailable. Only the error's code leaves here."""
        error = exc.args[0] if exc.args else None
        code = error.code() if isinstance(error, KafkaError) else None
        where = f"Kafka topic {topic!r} of system {task.system!r}"
        if code == KafkaError.UNKNOWN_TOPIC_OR_PART:
            return SchemaMismatch(
                f"{where} does not exist on the broker at {self._bootstrap}: nothing changed"
            )
        if code in REFUSALS and isinstance(error, KafkaError):
            action = "changing" if changing else "reading"
            return DriverRefused(
                f"{where}: the broker refused {action} its settings ({error.name()})"
            )
        return lethe_error(exc, f"Kafka at {self._bootstrap}") or ServiceUnavailable(
            f"Kafka at {self._bootstrap} did not answer ({type(exc).__name__})"
        )


def _fixed(change: Change, now: Mapping[str, str]) -> Change:
    """The change marked fixed when the topic now holds the value set."""
    setting, value = change.drift.setting, change.value
    there = now.get(setting, DEFAULTS[setting])
    if setting == "cleanup.policy":
        same = policies(there) == policies(value or "")
    else:
        same = there == value
    return Change(change.drift.model_copy(update={"fixed": same}), value, change.sooner)


def _held_detail(holds: SweepHolds) -> str:
    if holds.whole:
        why = f"legal hold(s) {', '.join(holds.whole)} keep the topic's records"
    else:
        why = (
            "legal holds on tenants or subjects are active, and a topic's retention removes "
            "every subject's records alike"
        )
    return f"settings that would remove records sooner were not changed: {why}"
