"""The Kafka retention sweep against the stack's broker: a topic's settings compared with the
rules for its categories, drift reported, and with `apply` changed (checked with the AdminClient).

Tasks come from `plan_sweep` over a small data map and pack; the sweep runs as the `kafka.sweep`
activity of a worker in region eu.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    ResourceType,
)
from temporalio.exceptions import ApplicationError

from lethe.activities.connectors import Connectors
from lethe.contracts import SweepResult, SweepTask
from tests.sweeps import hold, planned_task, sweep_batch, sweep_once

from .test_kafka import MakeTopic, admin, make_topic

__all__ = ["admin", "make_topic"]  # fixtures, shared with test_kafka.py

DAY_MS = 86_400_000
LIMIT = {
    "id": "test.contact.storage-limit",
    "category": "user.contact",
    "kind": "limit",
    "period": "90d",
    "citation": "GDPR Art. 5(1)(e)",
}
OBLIGATION = {
    "id": "test.financial.audit-trail",
    "category": "user.financial",
    "kind": "obligation",
    "period": "7y",
    "citation": "17 CFR 210.2-06",
}
NOW = datetime(2026, 12, 7, tzinfo=UTC)


def _task(topic: str, *categories: str) -> SweepTask:
    """The one sweep task of a map with `topic` (holding `categories`) under the pack above."""
    topics = [
        {
            "topic": topic,
            "key_template": "patient:{subject_id}",
            "categories": list(categories),
            "retention": {"created": "timestamp"},
        }
    ]
    return planned_task({"name": "events", "kind": "kafka", "topics": topics}, [LIMIT, OBLIGATION])


async def _sweep(connectors: Connectors, task: SweepTask, **options: Any) -> SweepResult:
    """One `kafka.sweep` call: a topic is one batch."""
    return await sweep_once(connectors, sweep_batch(task, NOW, **options))


def _configs(admin: AdminClient, topic: str) -> dict[str, Any]:
    futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic)])
    entries = next(iter(futures.values())).result(30)
    return {name: entry.value for name, entry in entries.items()}


def _drift(result: SweepResult) -> dict[str, tuple[str, str, bool]]:
    return {d.setting: (d.found, d.wanted, d.fixed) for d in result.drift}


async def test_a_topic_kept_for_ever_under_a_limit_is_reported_then_changed_by_apply(
    connectors: Connectors, admin: AdminClient, make_topic: MakeTopic
) -> None:
    topic = make_topic({"retention.ms": "-1"}, partitions=1)
    task = _task(topic, "user.contact")
    limit = str(90 * DAY_MS)

    reported = await _sweep(connectors, task)
    dry = await _sweep(connectors, task, apply=True, dry_run=True)

    for result in (reported, dry):
        assert result.done and result.removed == 0 and result.cursor is None
        assert _drift(result) == {"retention.ms": ("-1", limit, False)}
        [drift] = result.drift
        assert drift.target == topic
        assert drift.breaks == "test.contact.storage-limit: kept for ever, longer than 90d"
    assert _configs(admin, topic)["retention.ms"] == "-1"  # neither changed anything

    applied = await _sweep(connectors, task, apply=True)

    assert _drift(applied) == {"retention.ms": ("-1", limit, True)}
    assert _configs(admin, topic)["retention.ms"] == limit
    again = await _sweep(connectors, task, apply=True)
    assert again.done and again.drift == []


async def test_a_compacted_topic_keeps_compaction_and_gains_bounds_under_a_limit(
    connectors: Connectors, admin: AdminClient, make_topic: MakeTopic
) -> None:
    topic = make_topic({"cleanup.policy": "compact", "delete.retention.ms": str(200 * DAY_MS)})
    task = _task(topic, "user.contact")
    limit = str(90 * DAY_MS)

    applied = await _sweep(connectors, task, apply=True)

    found = _drift(applied)
    assert found["cleanup.policy"] == ("compact", "compact,delete", True)
    assert "retention.ms" not in found  # the broker's 7 days are within the limit
    assert found["max.compaction.lag.ms"] == ("9223372036854775807", limit, True)
    assert found["delete.retention.ms"] == (str(200 * DAY_MS), limit, True)
    configs = _configs(admin, topic)
    assert set(configs["cleanup.policy"].split(",")) == {"compact", "delete"}
    assert configs["max.compaction.lag.ms"] == limit
    assert configs["delete.retention.ms"] == limit
    assert int(configs["retention.ms"]) <= 90 * DAY_MS
    assert (await _sweep(connectors, task)).drift == []


async def test_a_topic_too_short_for_an_obligation_is_reported_and_raised_by_apply(
    connectors: Connectors, admin: AdminClient, make_topic: MakeTopic
) -> None:
    topic = make_topic({"retention.ms": str(7 * DAY_MS)}, partitions=1)
    task = _task(topic, "user.financial")
    seven_years = str(2555 * DAY_MS)

    reported = await _sweep(connectors, task)

    [drift] = reported.drift
    assert (drift.setting, drift.found, drift.wanted, drift.fixed) == (
        "retention.ms",
        str(7 * DAY_MS),
        seven_years,
        False,
    )
    assert (
        drift.breaks == "test.financial.audit-trail: kept 7d, shorter than the 7y it must be kept"
    )
    assert _configs(admin, topic)["retention.ms"] == str(7 * DAY_MS)

    # An obligation's change keeps records longer: a legal hold does not stop it.
    applied = await _sweep(connectors, task, apply=True, holds=[hold("system", "events")])

    assert _drift(applied) == {"retention.ms": (str(7 * DAY_MS), seven_years, True)}
    assert _configs(admin, topic)["retention.ms"] == seven_years
    assert (await _sweep(connectors, task)).drift == []


async def test_a_legal_hold_stops_apply_from_shortening_a_topic(
    connectors: Connectors, admin: AdminClient, make_topic: MakeTopic
) -> None:
    topic = make_topic({"retention.ms": "-1"}, partitions=1)
    task = _task(topic, "user.contact")
    legal_hold = hold("category", "user.contact")

    result = await _sweep(connectors, task, apply=True, holds=[legal_hold])

    assert _drift(result) == {"retention.ms": ("-1", str(90 * DAY_MS), False)}
    assert legal_hold.id in result.detail and "not changed" in result.detail
    assert _configs(admin, topic)["retention.ms"] == "-1"


async def test_a_topic_the_broker_lacks_is_a_clear_error_and_nothing_changes(
    connectors: Connectors, admin: AdminClient
) -> None:
    topic = "test-kafka-no-such-topic-retention"
    task = _task(topic, "user.contact")

    with pytest.raises(ApplicationError) as raised:
        await _sweep(connectors, task, apply=True)

    assert raised.value.type == "SchemaMismatch"
    assert raised.value.non_retryable
    assert f"Kafka topic {topic!r} of system 'events' does not exist" in str(raised.value)
    assert topic not in admin.list_topics(timeout=10).topics
