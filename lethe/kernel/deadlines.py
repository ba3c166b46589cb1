"""Calendar arithmetic for legal deadlines (GDPR Art. 12(3) counts in months), and the erasure
window: a duration (`30d`, `12h`) that ends at the deadline at the latest unless the plan says
otherwise."""

from __future__ import annotations

import calendar
import re
from datetime import datetime, timedelta
from functools import lru_cache

_UNITS = {"w": timedelta(weeks=1), "d": timedelta(days=1), "h": timedelta(hours=1)}
_UNITS |= {"m": timedelta(minutes=1), "s": timedelta(seconds=1)}
_PART = re.compile(r"(\d+)([wdhms])")
_DURATION = re.compile(r"(?:\d+[wdhms])+")


def add_months(moment: datetime, months: int) -> datetime:
    """The same day `months` later, or the month's last day if shorter (Jan 31 -> Feb 28)."""
    index = moment.month - 1 + months
    year, month = moment.year + index // 12, index % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def parse_duration(text: str) -> timedelta:
    """`30d`, `12h`, `90m` (minutes), `45s`, `2w`, or several together (`1d12h`).

    ValueError, saying what is accepted, for anything else: a bare number (which unit?) or a
    month (`1M`, `1mo`), which is no fixed length (deadlines count months; windows do not).
    """
    cleaned = text.strip()
    if not _DURATION.fullmatch(cleaned):
        raise ValueError(
            f"{text[:40]!r} is not a duration: give a number and a unit (w, d, h, m for "
            "minutes, s), e.g. 30d or 12h; months are not a fixed length, say days"
        )
    try:
        return sum(
            (int(number) * _UNITS[unit] for number, unit in _PART.findall(cleaned)),
            start=timedelta(0),
        )
    except OverflowError:
        raise ValueError(f"{text[:40]!r} is too long a duration") from None


def format_duration(duration: timedelta) -> str:
    """A duration as the packs write it: `30d`, `1d12h`, `12h`, `0s`."""
    seconds = int(duration.total_seconds())
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
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
