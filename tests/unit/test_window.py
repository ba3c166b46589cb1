"""The erasure window: a duration in the pack (`30d`, `12h`; `window_days` still read), carried
in the plan, ending at the Art. 12(3) deadline when that comes first unless the plan says so."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from lethe.contracts import ErasureRequest, Plan, Subject
from lethe.kernel.deadlines import (
    add_months,
    format_duration,
    parse_duration,
    shortest_months,
    window_end,
)
from lethe.kernel.yamlfile import InvalidFile
from lethe.plans.planner import Planner
from lethe.policies.model import PACKS_DIR, load_pack
from tests.unit.test_planning import DATAMAP, REF

GDPR = (PACKS_DIR / "gdpr.yaml").read_text()
WINDOW_LINE = next(line for line in GDPR.splitlines(keepends=True) if line.startswith("  window:"))


def _pack(tmp_path: Path, window_lines: str) -> Path:
    """gdpr.yaml with its window line replaced by `window_lines`."""
    assert GDPR.count(WINDOW_LINE) == 1
    path = tmp_path / "pack.yaml"
    path.write_text(GDPR.replace(WINDOW_LINE, window_lines))
    return path


def _plan(pack: Path) -> Plan:
    request = ErasureRequest(
        subject=Subject(tenant="st-mary", subject_id="p-1", identities={"email": "a@b.org"}),
        requested_by="dpo",
    )
    return Planner.from_files(DATAMAP, pack).plan(request, "req-1", REF)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", timedelta(days=30)),
        ("12h", timedelta(hours=12)),
        ("1d12h", timedelta(days=1, hours=12)),
        ("90m", timedelta(minutes=90)),
        ("0d", timedelta(0)),
        ("2w", timedelta(days=14)),
    ],
)
def test_durations_parse_and_print_back(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected
    assert parse_duration(format_duration(expected)) == expected


@pytest.mark.parametrize("text", ["30", "1M", "1mo", "30 days", "-1d", "", "d"])
def test_what_is_not_a_duration_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ("  window: 30d\n", timedelta(days=30)),
        ("  window: 12h\n", timedelta(hours=12)),
        ("  window_days: 30\n", timedelta(days=30)),  # an older pack
        ("  window_days: 0\n", timedelta(0)),
        ("", timedelta(days=30)),  # neither: the default
    ],
)
def test_the_pack_gives_its_window_as_a_duration_or_in_days(
    tmp_path: Path, lines: str, expected: timedelta
) -> None:
    pack = load_pack(_pack(tmp_path, lines))
    assert pack.erasure.window_length == expected
    plan = _plan(_pack(tmp_path, lines))
    assert plan.window == expected
    assert plan.window_length == expected
    assert plan.window_days == -(-expected // timedelta(days=1))  # whole days, rounded up


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ("  window: 30d\n  window_days: 30\n", "`window` (e.g. 30d) or `window_days`, not both"),
        ("  window: 30\n", "erasure.window"),
        ("  window: 30\n", "has no unit: say `30d`"),
        ("  window: 1M\n", "erasure.window"),
        ("  window: 1M\n", "months are not a fixed length"),
        ("  window: 400d\n", "window: 400d is outside 0s to 365d"),
        ("  window_days: 400\n", "erasure.window_days"),
        ("  window_days: 1.5\n", "erasure.window_days"),
    ],
)
def test_a_bad_window_is_refused_naming_the_field(
    tmp_path: Path, lines: str, expected: str
) -> None:
    with pytest.raises(InvalidFile) as raised:
        load_pack(_pack(tmp_path, lines))
    assert expected in str(raised.value)
    assert "pack.yaml:" in str(raised.value)


def test_a_30_day_window_for_a_request_of_1_february_ends_at_the_deadline() -> None:
    """1 February + one month is 1 March, 28 days: the window ends there, not on 3 March."""
    received = datetime(2027, 2, 1, 9, 0, tzinfo=UTC)
    started = received + timedelta(minutes=5)  # approval took five minutes
    deadline = add_months(received, 1)
    assert deadline == datetime(2027, 3, 1, 9, 0, tzinfo=UTC)
    assert window_end(started, timedelta(days=30), deadline) == deadline
    # Unless the plan says the window may end after the deadline.
    assert window_end(started, timedelta(days=30), deadline, past_deadline=True) == (
        started + timedelta(days=30)
    )
    # A window that fits is left alone; a leap year's February has 29 days.
    assert window_end(started, timedelta(days=20), deadline) == started + timedelta(days=20)
    leap = datetime(2028, 2, 1, tzinfo=UTC)
    assert add_months(leap, 1) - leap == timedelta(days=29)
    # A request that starts after its deadline (a late approval) runs its deferred steps at once.
    late = deadline + timedelta(days=2)
    assert window_end(late, timedelta(days=30), deadline) == late


def test_the_shortest_months_are_counted_from_february() -> None:
    assert shortest_months(1) == timedelta(days=28)
    assert shortest_months(2) == timedelta(days=59)
    assert shortest_months(3) == timedelta(days=89)


def test_the_plan_says_when_the_window_may_outlast_the_deadline(tmp_path: Path) -> None:
    safe = _plan(_pack(tmp_path, "  window: 30d\n"))
    assert safe.window_ends_after_deadline is False
    assert "ends at the deadline when that comes first" in safe.window_note
    assert "as short as 28 days" in safe.window_note
    assert _plan(_pack(tmp_path, "  window: 12h\n")).window_note == ""

    allowed = _plan(
        _pack(
            tmp_path,
            "  window: 30d\n  window_may_end_after_deadline: backups rotate monthly (DPA 2026/4)\n",
        )
    )
    assert allowed.window_ends_after_deadline is True
    assert "may end after the 1-month deadline" in allowed.window_note
    assert "backups rotate monthly (DPA 2026/4)" in allowed.window_note


def test_a_plan_from_before_windows_were_durations_still_reads() -> None:
    """Recorded histories hold Plans as payloads without the new fields."""
    plan = _plan(PACKS_DIR / "gdpr.yaml")
    old = plan.model_dump(mode="json")
    for name in ("window", "window_ends_after_deadline", "window_note", "retry_of"):
        del old[name]
    old["window_days"] = 30
    read = Plan.model_validate(old)
    assert read.window is None
    assert read.window_length == timedelta(days=30)
    assert read.window_ends_after_deadline is False
    again = Plan.model_validate_json(plan.model_dump_json())
    assert again.window == timedelta(days=30)
