"""The bulk benchmark's result: the figures, the targets, what `--json` writes, and the table
and verdicts it prints."""

from __future__ import annotations

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from bench.erasure_parts.result import CpuUse

TARGET_RATE = 1000.0
"""Subjects per second in the immediate phase."""
TARGET_RATIO = 0.5
"""Lethe's rate over the raw batched floor's."""
TARGET_RSS_MB = 500.0
"""The worker's peak resident memory."""


class History(BaseModel):
    """The bulk request's histories, over every run of its continue-as-new chain."""

    runs: int
    events: int
    workflow_tasks: int
    local_activities: int
    """Marker events: each local activity's result (bulk.next_batch, bulk.record_batch, ...)."""
    activities: int
    bytes: int
    """The histories' size (serialised events), most of it the batches' activity inputs and
    results (encrypted payloads)."""

    def per_thousand(self, count: int, subjects: int) -> float:
        """`count` per 1,000 subjects."""
        return count * 1000 / subjects


class Result(BaseModel):
    """What `--json` writes (seconds, subjects per second, CPU in ms per subject, MB)."""

    subjects: int
    batch_size: int
    batches: int
    lethe_seconds: float
    lethe_submit_seconds: float
    """Of lethe_seconds: checking the subjects file, staging it sealed, starting the workflow."""
    lethe_rate: float
    floor_seconds: float
    floor_rate: float
    ratio: float
    history: History
    history_events_per_1000: float
    cpu_lethe: CpuUse | None
    cpu_floor: CpuUse | None
    worker_peak_rss_mb: float
    rate_met: bool
    ratio_met: bool
    memory_met: bool


def show_result(console: Console, result: Result) -> None:
    """The comparison table and a verdict per target."""
    n = result.subjects
    table = Table(
        title=f"Bulk erasure, immediate phase: {n:,} subjects, batches of {result.batch_size}"
    )
    table.add_column("")
    table.add_column("Lethe", justify="right")
    table.add_column("raw floor", justify="right")
    table.add_row("seconds", f"{result.lethe_seconds:.1f}", f"{result.floor_seconds:.1f}")
    table.add_row("subjects per second", f"{result.lethe_rate:.0f}", f"{result.floor_rate:.0f}")
    table.add_row("Lethe / floor", f"{result.ratio:.2f}", "")
    table.add_row("of which submit (check, stage, start)", f"{result.lethe_submit_seconds:.1f}", "")
    h = result.history
    table.add_row("history events per 1,000 subjects", f"{result.history_events_per_1000:.0f}", "")
    table.add_row(
        "  workflow tasks / local activities / activities per 1,000",
        f"{h.per_thousand(h.workflow_tasks, n):.0f} / {h.per_thousand(h.local_activities, n):.0f}"
        f" / {h.per_thousand(h.activities, n):.0f}",
        "",
    )
    table.add_row("history KB per 1,000 subjects", f"{h.per_thousand(h.bytes, n) / 1024:.0f}", "")
    table.add_row("continue-as-new runs", str(h.runs), "")
    for side, use, col in (("Lethe", result.cpu_lethe, 1), ("floor", result.cpu_floor, 2)):
        if use is None:
            continue
        for name, value in use.ms_per_erasure.items():
            cells = ["", ""]
            cells[col - 1] = f"{value:.3f}"
            table.add_row(f"CPU ms per subject: {name}", *cells)
        cells = ["", ""]
        cells[col - 1] = f"{use.machine_busy:.0%} of {use.cores} cores"
        table.add_row(f"machine busy ({side})", *cells)
    table.add_row("worker peak RSS (MB)", f"{result.worker_peak_rss_mb:.0f}", "")
    console.print(table)
    for met, line in (
        (result.rate_met, f">= {TARGET_RATE:.0f} subjects/s: {result.lethe_rate:.0f}"),
        (result.ratio_met, f">= {TARGET_RATIO:.0%} of the raw floor: {result.ratio:.0%}"),
        (
            result.memory_met,
            f"worker RSS < {TARGET_RSS_MB:.0f} MB: {result.worker_peak_rss_mb:.0f} MB",
        ),
    ):
        colour = "green" if met else "red"
        console.print(f"[{colour}]{'met' if met else 'MISSED'}[/{colour}]  {line}")
