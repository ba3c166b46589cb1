"""How the benchmarks print: milliseconds, and tables of named durations (rich)."""

from __future__ import annotations

import statistics

from rich.console import Console
from rich.table import Table

from bench.harness.stats import percentile
from bench.harness.timings import Segments


def ms(seconds: float) -> str:
    """Seconds as milliseconds, for tables."""
    return f"{seconds * 1000:.1f}"


def show_segments(console: Console, title: str, segments: Segments, note: str) -> None:
    """A table of named durations: mean, p50, p95 and max in milliseconds."""
    table = Table(title=title, caption=f"{note}; {segments.note}" if segments.note else note)
    table.add_column("segment")
    for heading in ("mean ms", "p50 ms", "p95 ms", "max ms"):
        table.add_column(heading, justify="right")
    for name, values in segments.values.items():
        table.add_row(
            name,
            ms(statistics.fmean(values)),
            ms(percentile(values, 50)),
            ms(percentile(values, 95)),
            ms(max(values)),
        )
    console.print(table)
