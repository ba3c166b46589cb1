"""The retention benchmark's result: what `--json` writes, and the table and verdict."""

from __future__ import annotations

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from bench.retention_parts.measure import Cost

TARGET_RATIO = 0.70
"""Lethe's sweep at least 70% of the floor's rows per second (issue 11)."""
AIM_RATIO = 0.85


class Side(BaseModel):
    """One side: the rows it deleted, in how many batches, and what that cost."""

    removed: int
    batches: int
    cost: Cost

    @property
    def rows_per_s(self) -> float:
        """Rows deleted per second of the side's elapsed time."""
        return self.removed / self.cost.seconds


class Result(BaseModel):
    """What `--json` writes."""

    rows: int
    expired: int
    batch_size: int
    floor: Side
    lethe: Side
    floor_rows_per_s: float
    lethe_rows_per_s: float
    ratio: float
    """Lethe's rows per second over the floor's."""
    target_met: bool
    aim_met: bool
    where_time_goes: dict[str, float] = {}
    """Lethe's batches: mean milliseconds per batch of each segment (from the history)."""
    floor_batch_ms: float = 0.0
    """The floor: mean milliseconds per batch."""


def result_of(rows: int, expired: int, batch_size: int, floor: Side, lethe: Side) -> Result:
    """The figures and the verdicts."""
    ratio = lethe.rows_per_s / floor.rows_per_s
    return Result(
        rows=rows,
        expired=expired,
        batch_size=batch_size,
        floor=floor,
        lethe=lethe,
        floor_rows_per_s=floor.rows_per_s,
        lethe_rows_per_s=lethe.rows_per_s,
        ratio=ratio,
        target_met=ratio >= TARGET_RATIO,
        aim_met=ratio >= AIM_RATIO,
        floor_batch_ms=floor.cost.seconds / floor.batches * 1000,
    )


def show(console: Console, result: Result) -> None:
    """The comparison table and the verdict."""
    table = Table(
        title=f"Retention sweep: {result.expired:,} expired rows of {result.rows:,}, "
        f"batches of {result.batch_size:,}"
    )
    for heading in ("", "Lethe", "raw floor", "Lethe / floor"):
        table.add_column(heading, justify="right" if heading else "left")
    lethe, floor = result.lethe, result.floor
    table.add_row(
        "rows deleted per second",
        f"{result.lethe_rows_per_s:,.0f}",
        f"{result.floor_rows_per_s:,.0f}",
        f"{result.ratio:.3f}",
    )
    table.add_row(
        "elapsed, s",
        f"{lethe.cost.seconds:.1f}",
        f"{floor.cost.seconds:.1f}",
        f"{lethe.cost.seconds / floor.cost.seconds:.2f}x",
    )
    table.add_row("batches", f"{lethe.batches}", f"{floor.batches}", "")
    table.add_row(
        "CPU of this process, s (workers / floor)",
        f"{lethe.cost.cpu_s:.1f}",
        f"{floor.cost.cpu_s:.1f}",
        f"{lethe.cost.cpu_s / floor.cost.cpu_s:.1f}x" if floor.cost.cpu_s else "",
    )
    table.add_row(
        "CPU of the Temporal server, s",
        _maybe(lethe.cost.server_cpu_s),
        _maybe(floor.cost.server_cpu_s),
        "",
    )
    table.add_row(
        "machine busy", f"{lethe.cost.machine_busy:.0%}", f"{floor.cost.machine_busy:.0%}", ""
    )
    table.add_row(
        "peak RSS of this process, MiB (at start)",
        f"{lethe.cost.rss_peak_mib:.0f} ({lethe.cost.rss_start_mib:.0f})",
        f"{floor.cost.rss_peak_mib:.0f} ({floor.cost.rss_start_mib:.0f})",
        "",
    )
    console.print(table)
    if result.where_time_goes:
        breakdown = Table(title="Where Lethe's time goes, mean ms per batch (from its history)")
        breakdown.add_column("segment")
        breakdown.add_column("ms", justify="right")
        for name, value in result.where_time_goes.items():
            breakdown.add_row(name, f"{value:.1f}")
        breakdown.add_row(
            "the floor, one batch (DELETE ... RETURNING, commit)", f"{result.floor_batch_ms:.1f}"
        )
        console.print(breakdown)
    verdict = "met" if result.target_met else "NOT met"
    aim = "reached" if result.aim_met else "not reached"
    console.print(
        f"target Lethe >= {TARGET_RATIO:.0%} of the floor's rows/s: {verdict} "
        f"({result.ratio:.1%}); aim {AIM_RATIO:.0%}: {aim}"
    )


def _maybe(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"
