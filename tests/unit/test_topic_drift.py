"""A topic's retention settings against a limit and obligations (`topic_drift`, pure)."""

from __future__ import annotations

from datetime import timedelta

from lethe.activities.kafka_retention import Change, topic_drift
from lethe.classification.datamap import DateTrigger
from lethe.contracts import RuleTerm
from tests.sweeps import term

DAY_MS = 86_400_000
FOREVER_MAX_LAG = "9223372036854775807"


def _limit(days: int, trigger: DateTrigger = "created") -> RuleTerm:
    return term("limit", timedelta(days=days), trigger=trigger, rule="gdpr.device.storage-limit")


def _obligation(days: int, trigger: DateTrigger = "created") -> RuleTerm:
    return term("obligation", timedelta(days=days), trigger=trigger, rule="sox.audit-trail")


def _topic(
    retention_ms: int,
    policy: str = "delete",
    lag: str = FOREVER_MAX_LAG,
    delete_retention_ms: int = DAY_MS,
) -> dict[str, str]:
    return {
        "retention.ms": str(retention_ms),
        "cleanup.policy": policy,
        "max.compaction.lag.ms": lag,
        "delete.retention.ms": str(delete_retention_ms),
    }


def _by_setting(changes: list[Change]) -> dict[str, tuple[str, str, str | None]]:
    return {c.drift.setting: (c.drift.found, c.drift.wanted, c.value) for c in changes}


def test_a_topic_within_its_limit_has_no_drift() -> None:
    assert topic_drift("t", _topic(30 * DAY_MS), _limit(90), []) == []
    assert topic_drift("t", _topic(90 * DAY_MS), _limit(90), []) == []


def test_a_topic_kept_for_ever_breaks_the_limit() -> None:
    [change] = topic_drift("t", _topic(-1), _limit(90), [])
    assert change.drift.target == "t"
    assert (change.drift.setting, change.drift.found, change.drift.wanted) == (
        "retention.ms",
        "-1",
        str(90 * DAY_MS),
    )
    assert change.drift.breaks.startswith("gdpr.device.storage-limit: kept for ever, longer")
    assert change.value == str(90 * DAY_MS) and change.sooner


def test_a_topic_kept_longer_than_the_limit_breaks_it() -> None:
    [change] = topic_drift("t", _topic(365 * DAY_MS), _limit(90), [])
    assert change.drift.breaks == "gdpr.device.storage-limit: kept 1y, longer than 90d"


def test_a_compacted_topic_gains_delete_and_bounds_on_compaction_and_tombstones() -> None:
    found = _topic(-1, policy="compact", delete_retention_ms=200 * DAY_MS)
    changes = _by_setting(topic_drift("t", found, _limit(90), []))
    limit = str(90 * DAY_MS)
    assert changes == {
        "cleanup.policy": ("compact", "compact,delete", "compact,delete"),
        "retention.ms": ("-1", limit, limit),
        "max.compaction.lag.ms": (FOREVER_MAX_LAG, limit, limit),
        "delete.retention.ms": (str(200 * DAY_MS), limit, limit),
    }


def test_a_compacted_topic_within_every_bound_has_no_drift() -> None:
    found = _topic(
        30 * DAY_MS, policy="compact,delete", lag=str(DAY_MS), delete_retention_ms=DAY_MS
    )
    assert topic_drift("t", found, _limit(90), []) == []


def test_a_topic_too_short_for_an_obligation_breaks_it() -> None:
    [change] = topic_drift("t", _topic(7 * DAY_MS), None, [_obligation(2555)])
    assert _by_setting([change]) == {
        "retention.ms": (str(7 * DAY_MS), str(2555 * DAY_MS), str(2555 * DAY_MS))
    }
    assert change.drift.breaks == "sox.audit-trail: kept 7d, shorter than the 7y it must be kept"
    assert not change.sooner


def test_an_obligation_is_met_by_keeping_for_ever_or_long_enough_or_not_deleting() -> None:
    for found in (
        _topic(-1),
        _topic(2555 * DAY_MS),
        _topic(3000 * DAY_MS),
        _topic(DAY_MS, policy="compact"),
    ):
        assert topic_drift("t", found, None, [_obligation(2555)]) == []


def test_the_obligation_wins_over_the_limit() -> None:
    longest = str(2555 * DAY_MS)
    # Longer than the limit but within the obligation: nothing to change.
    assert topic_drift("t", _topic(2555 * DAY_MS), _limit(90), [_obligation(2555)]) == []
    # For ever: down to the obligation, not to the limit.
    [change] = topic_drift("t", _topic(-1), _limit(90), [_obligation(2555)])
    assert (change.drift.wanted, change.value) == (longest, longest)
    assert change.drift.breaks.startswith("gdpr.device.storage-limit: kept for ever")
    # Too short: up to the obligation, breaking it, not the limit.
    [short] = topic_drift("t", _topic(30 * DAY_MS), _limit(90), [_obligation(2555)])
    assert short.drift.breaks.startswith("sox.audit-trail: kept 30d, shorter")
    assert short.drift.wanted == longest


def test_a_limit_that_adds_delete_also_checks_the_obligation() -> None:
    found = _topic(DAY_MS, policy="compact", lag=str(DAY_MS), delete_retention_ms=DAY_MS)
    changes = _by_setting(topic_drift("t", found, _limit(90), [_obligation(365)]))
    assert changes == {
        "cleanup.policy": ("compact", "compact,delete", "compact,delete"),
        "retention.ms": (str(DAY_MS), str(365 * DAY_MS), str(365 * DAY_MS)),
    }


def test_an_obligation_from_a_date_kafka_lacks_wants_the_records_kept_for_ever() -> None:
    [change] = topic_drift("t", _topic(3000 * DAY_MS), _limit(90), [_obligation(2190, "closed")])
    assert (change.drift.setting, change.drift.wanted, change.value) == (
        "retention.ms",
        "-1",
        "-1",
    )
    assert change.drift.breaks.startswith("sox.audit-trail: keeps records 6y from closed")
    assert "cannot date" in change.drift.breaks
    # Kept for ever already: the obligation holds and wins over the limit.
    assert topic_drift("t", _topic(-1), _limit(90), [_obligation(2190, "closed")]) == []


def test_a_limit_from_a_date_kafka_lacks_is_reported_never_set() -> None:
    [change] = topic_drift("t", _topic(-1), _limit(90, "last_activity"), [])
    assert change.value is None
    assert "cannot be checked" in change.drift.breaks
    assert topic_drift("t", _topic(30 * DAY_MS), _limit(90, "last_activity"), []) == []


def test_missing_settings_take_kafkas_defaults() -> None:
    [change] = topic_drift("t", {}, _limit(1), [])
    assert (change.drift.setting, change.drift.found) == ("retention.ms", str(7 * DAY_MS))
