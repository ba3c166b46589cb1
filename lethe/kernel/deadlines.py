"""Calendar arithmetic for legal deadlines (GDPR Art. 12(3) counts in months), the erasure
window: a duration (`30d`, `12h`) that ends at the deadline at the latest unless the plan says
otherwise, and retention periods (`6y`, `395d`; a year is 365 days)."""

from __future__ import annotations

import calendar
import re
from datetime import datetime, timedelta
from functools import lru_cache

_UNITS = {"w": timedelta(weeks=1), "d": timedelta(days=1), "h": timedelta(hours=1)}
_UNITS |= {"m": timedelta(minutes=1), "s": timedelta(seconds=1)}
_PART = re.compile(r"(\d+)([ywdhms])")
_DURATION = re.compile(r"(?:\d+[wdhms])+")
_DURATION_WITH_YEARS = re.compile(r"(?:\d+[ywdhms])+")
YEAR = timedelta(days=365)
"""A year in a retention period: 365 days, always (a fixed length, like every duration here;
laws that count calendar years keep at most one day more per leap year)."""
_UNITS["y"] = YEAR  # accepted only where years are (`parse_duration(..., years=True)`)


def add_months(moment: datetime, months: int) -> datetime:
    """The same day `months` later, or the month's last day if shorter (Jan 31 -> Feb 28)."""
    index = moment.month - 1 + months
    year, month = moment.year + index // 12, index % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def parse_duration(text: str, *, years: bool = False) -> timedelta:
    """`30d`, `12h`, `90m` (minutes), `45s`, `2w`, or several together (`1d12h`); with `years`,
    also `6y` (365 days a year), as retention periods are written.

    ValueError, saying what is accepted, for anything else: a bare number (which unit?) or a
    month (`1M`, `1mo`), which is no fixed length (deadlines count months; windows do not).
    """
    cleaned = text.strip()
    pattern = _DURATION_WITH_YEARS if years else _DURATION
    if not pattern.fullmatch(cleaned):
        units = "y (365 days), w, d, h, m for minutes, s" if years else "w, d, h, m for minutes, s"
        example = "6y or 395d" if years else "30d or 12h"
        raise ValueError(
            f"{text[:40]!r} is not a duration: give a number and a unit ({units}), e.g. "
            f"{example}; months are not a fixed length, say days"
        )
    try:
        return sum(
            (int(number) * _UNITS[unit] for number, unit in _PART.findall(cleaned)),
            start=timedelta(0),
        )
    except OverflowError:
        raise ValueError(f"{text[:40]!r} is too long a duration") from None


def format_duration(duration: timedelta, *, years: bool = False) -> str:
    """A duration as the packs write it: `30d`, `1d12h`, `12h`, `0s`; `-` before a negative one.

    With `years`, a period of whole years (give or take a leap day a year) is written in years,
    as retention periods are (`6y`, `6y2d`); any other stays in days (`395d`).
    """
    if duration < timedelta(0):
        return "-" + format_duration(-duration, years=years)
    seconds = int(duration.total_seconds())
    parts = []
    sizes: tuple[tuple[str, int], ...] = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    whole_years, rest = divmod(duration.days, 365)
    if years and whole_years and rest <= -(-whole_years // 4):
        sizes = (("y", 365 * 86400), *sizes)
    for unit, size in sizes:
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts) or "0s"


@lru_cache(maxsize=8)
def shortest_months(months: int) -> timedelta:
    """The shortest time `months` calendar months can last (one month: 28 days, from 1 Feb
    of a common year), over every start day of a four-year cycle."""
    start = datetime(2025, 1, 1)
    return min(
        add_months(day, months) - day for day in (start + timedelta(days=n) for n in range(1461))
    )


def window_end(
    started_at: datetime, window: timedelta, deadline: datetime, *, past_deadline: bool = False
) -> datetime:
    """When the erasure window of an erasure started at `started_at` ends.

    `window` after the start, but never after `deadline` (minus nothing), unless
    `past_deadline` (the plan says the window may end after it); never before the start (an
    erasure that starts after its deadline runs its deferred steps at once).
    """
    end = started_at + window
    if past_deadline:
        return end
    return max(started_at, min(end, deadline))
