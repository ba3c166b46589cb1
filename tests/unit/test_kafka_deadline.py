"""When a Kafka topic's settings guarantee a subject's earlier records are gone, and the status."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from lethe.activities.kafka import LONG_MAX, Removal, removal_deadline, removal_status

TOMBSTONE = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SECOND_MS = 1000
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
BACKOFF = timedelta(seconds=15)  # log.cleaner.backoff.ms
CHECK = timedelta(minutes=5)  # log.retention.check.interval.ms


def _settings(policy: str, **values: int) -> dict[str, str]:
    settings = {
        "cleanup.policy": policy,
        "max.compaction.lag.ms": str(LONG_MAX),
        "delete.retention.ms": str(DAY_MS),
        "retention.ms": str(7 * DAY_MS),
        "segment.ms": str(7 * DAY_MS),
        "log.cleaner.backoff.ms": str(15 * SECOND_MS),
        "log.retention.check.interval.ms": str(300 * SECOND_MS),
    }
    settings.update({name.replace("_", "."): str(value) for name, value in values.items()})
    return settings


# --- the bound ---------------------------------------------------------------------------------


def test_compaction_is_bounded_by_the_longer_of_segment_roll_and_compaction_lag() -> None:
    removal = removal_deadline(
        _settings("compact", segment_ms=HOUR_MS, max_compaction_lag_ms=DAY_MS), TOMBSTONE
    )
    assert removal.gone_by == TOMBSTONE + timedelta(days=1) + BACKOFF
    assert removal.by_compaction
    assert removal.cleaner_backoff_ms == 15 * SECOND_MS
    assert "max.compaction.lag.ms=86400000" in removal.reason

    # The active segment is never compacted, so a long segment.ms outlasts a short lag.
    longer_segment = removal_deadline(
        _settings("compact", segment_ms=2 * DAY_MS, max_compaction_lag_ms=HOUR_MS), TOMBSTONE
    )
    assert longer_segment.gone_by == TOMBSTONE + timedelta(days=2) + BACKOFF


def test_compaction_without_a_lag_bound_never_guarantees_removal() -> None:
    removal = removal_deadline(_settings("compact"), TOMBSTONE)
    assert removal.gone_by is None
    assert f"max.compaction.lag.ms={LONG_MAX} (no bound) never forces compaction" in removal.reason


def test_retention_deletes_within_retention_plus_one_segment_plus_one_check() -> None:
    removal = removal_deadline(
        _settings("delete", retention_ms=30 * DAY_MS, segment_ms=DAY_MS), TOMBSTONE
    )
    assert removal.gone_by == TOMBSTONE + timedelta(days=31) + CHECK
    assert not removal.by_compaction
    assert removal.reason.startswith("cleanup.policy=delete")


def test_infinite_retention_never_removes_data() -> None:
    removal = removal_deadline(_settings("delete", retention_ms=-1), TOMBSTONE)
    assert removal.gone_by is None
    assert "retention.ms=-1 never removes data" in removal.reason
    assert "set max.compaction.lag.ms" in removal.reason


@pytest.mark.parametrize("policy", ["compact,delete", "delete,compact", "compact, delete"])
def test_compact_and_delete_take_the_earlier_bound(policy: str) -> None:
    by_retention = removal_deadline(
        _settings(policy, retention_ms=HOUR_MS, segment_ms=HOUR_MS), TOMBSTONE
    )
    assert by_retention.gone_by == TOMBSTONE + timedelta(hours=2) + CHECK
    assert not by_retention.by_compaction

    by_compaction = removal_deadline(
        _settings(
            policy, retention_ms=30 * DAY_MS, segment_ms=HOUR_MS, max_compaction_lag_ms=DAY_MS
        ),
        TOMBSTONE,
    )
    assert by_compaction.gone_by == TOMBSTONE + timedelta(days=1) + BACKOFF
    assert by_compaction.by_compaction


def test_compact_and_delete_with_neither_bounded_names_both_settings() -> None:
    removal = removal_deadline(_settings("compact,delete", retention_ms=-1), TOMBSTONE)
    assert removal.gone_by is None
    assert "max.compaction.lag.ms" in removal.reason
    assert "retention.ms=-1" in removal.reason


def test_a_policy_that_neither_compacts_nor_deletes_has_no_bound() -> None:
    removal = removal_deadline(_settings(""), TOMBSTONE)
    assert removal == Removal(None, "cleanup.policy= neither compacts nor deletes")


def test_missing_settings_take_kafka_defaults() -> None:
    removal = removal_deadline({}, TOMBSTONE)  # delete, 7 days retention, 7 days segments
    assert removal.gone_by == TOMBSTONE + timedelta(days=14) + CHECK


def test_a_bound_beyond_the_calendar_is_no_bound() -> None:
    removal = removal_deadline(_settings("delete", retention_ms=LONG_MAX - 1), TOMBSTONE)
    assert removal.gone_by is None
    assert "too long" in removal.reason


# --- the status --------------------------------------------------------------------------------

WINDOW_END = TOMBSTONE + timedelta(days=30)
BOUND = TOMBSTONE + timedelta(days=1)
COMPACTED = Removal(BOUND, "compaction", by_compaction=True, cleaner_backoff_ms=15 * SECOND_MS)
RETAINED = Removal(BOUND, "retention")
LATER = TOMBSTONE + timedelta(days=2)


def test_a_bound_in_the_future_within_the_window_is_pending() -> None:
    status, gone_by, detail = removal_status(COMPACTED, WINDOW_END, now=TOMBSTONE)
    assert (status, gone_by) == ("pending_compaction", BOUND)
    assert "2026-03-02T12:00:00+00:00" in detail


def test_never_done_before_the_bound_has_passed() -> None:
    just_before = BOUND - timedelta(milliseconds=1)
    status, _, _ = removal_status(COMPACTED, WINDOW_END, just_before, segment_rolled_at=TOMBSTONE)
    assert status == "pending_compaction"


def test_a_passed_compaction_bound_is_done_once_the_segment_rolled_long_enough_ago() -> None:
    rolled_at = TOMBSTONE + timedelta(hours=1)
    status, gone_by, detail = removal_status(COMPACTED, WINDOW_END, LATER, rolled_at)
    assert (status, gone_by) == ("done", None)
    assert detail.startswith("earlier records were gone by")


def test_a_late_roll_moves_the_bound_to_the_cleaner_s_next_pass() -> None:
    rolled_at = LATER - timedelta(seconds=5)  # the cleaner may not have woken since
    status, gone_by, _ = removal_status(COMPACTED, WINDOW_END, LATER, rolled_at)
    assert (status, gone_by) == ("pending_compaction", rolled_at + BACKOFF)


def test_a_passed_compaction_bound_without_a_later_record_is_at_risk() -> None:
    status, gone_by, detail = removal_status(COMPACTED, WINDOW_END, LATER, None)
    assert (status, gone_by) == ("at_risk", BOUND)
    assert "when a later record arrives" in detail


def test_a_roll_after_the_window_is_at_risk() -> None:
    window_end = LATER - timedelta(hours=1)
    rolled_at = window_end - timedelta(seconds=1)
    status, _, detail = removal_status(COMPACTED, window_end, LATER, rolled_at)
    assert status == "at_risk"
    assert "after the erasure window ends" in detail


def test_a_passed_retention_bound_needs_no_roll() -> None:
    assert removal_status(RETAINED, WINDOW_END, LATER)[0] == "done"


def test_a_bound_after_the_window_is_at_risk() -> None:
    status, gone_by, detail = removal_status(COMPACTED, TOMBSTONE + timedelta(hours=1), TOMBSTONE)
    assert (status, gone_by) == ("at_risk", BOUND)
    assert "after the erasure window ends" in detail


def test_no_bound_is_at_risk_with_the_reason() -> None:
    removal = removal_deadline(_settings("delete", retention_ms=-1), TOMBSTONE)
    status, gone_by, detail = removal_status(removal, WINDOW_END, TOMBSTONE)
    assert (status, gone_by) == ("at_risk", None)
    assert detail == removal.reason
