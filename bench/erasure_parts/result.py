"""The erasure benchmark's result: the figures, the targets, what `--json` writes, and the
comparison table and verdicts it prints."""

from __future__ import annotations

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from bench.harness.cpu import CpuSample, spent
from bench.harness.report import ms

TARGET_P95 = 0.3
"""Immediate phase p95, seconds."""
TARGET_RATE = 20.0
"""Erasures per second."""


class Figures(BaseModel):
    """One side of the comparison: latency percentiles (seconds) and throughput (per second)."""

    p50: float
    p95: float
    throughput: float


class CpuUse(BaseModel):
    """CPU used during one phase: per erasure by each process, and how busy the machine was."""

    ms_per_erasure: dict[str, float]
    machine_busy: float
    """The fraction of all cores' time that was not idle."""
    cores: int


def cpu_use(before: CpuSample, after: CpuSample, erasures: int) -> CpuUse | None:
    """What the processes used between two samples, per erasure."""
    found = spent(before, after)
    if found is None:
        return None
    return CpuUse(
        ms_per_erasure={name: s * 1000 / erasures for name, s in found.seconds.items()},
        machine_busy=found.machine_busy,
        cores=found.cores,
    )


class Result(BaseModel):
    """What `--json` writes: Lethe, both floors, the targets and whether they are met."""

    requests: int
    concurrent: int
    lethe: Figures
    poll_ms: float
    lethe_polled_p50: float | None
    lethe_polled_p95: float | None
    lethe_p95_under_load: float
    floor: Figures
    orchestration: Figures
    """The orchestration floor: Lethe's workflow shape with no-op activities."""
    orchestration_steps: int
    """Activities in the orchestration floor's child, one per immediate step of the plan."""
    orchestration_p95_under_load: float
    target_p95: float = TARGET_P95
    target_throughput: float = TARGET_RATE
    p95_met: bool
    throughput_met: bool
    throughput_target_above_orchestration: bool
    """The throughput target exceeds the orchestration floor: out of reach for this shape here."""
    cpu_one_at_a_time: CpuUse | None = None
    cpu_at_once: CpuUse | None = None
    cpu_orchestration_one_at_a_time: CpuUse | None = None
    cpu_orchestration_at_once: CpuUse | None = None


def cpu_ceiling(use: CpuUse | None) -> float | None:
    """Erasures per second the machine's cores could give at this CPU cost, if nothing else ran."""
    if use is None or not use.ms_per_erasure:
        return None
    return use.cores * 1000 / sum(use.ms_per_erasure.values())


def show_result(console: Console, result: Result) -> None:
    """The comparison table and the verdict on each target."""
    table = Table(
        title="Erasure, immediate phase: Lethe against the raw floor and Temporal's own floor",
        caption=(
            "raw floor: the same data-system work without Temporal; Temporal shape, no work: "
            f"Lethe's workflow shape with no-op activities (a preflight and "
            f"{result.orchestration_steps} steps on the region's queue)"
        ),
    )
    for heading in (
        "",
        "Lethe",
        "raw floor",
        "Lethe / raw floor",
        "Temporal shape, no work",
        "Lethe / Temporal shape",
    ):
        table.add_column(heading, justify="right" if heading else "left")
    lethe, floor, shape = result.lethe, result.floor, result.orchestration
    for label, attribute in (("latency p50 (ms)", "p50"), ("latency p95 (ms)", "p95")):
        mine, raw, bare = (getattr(f, attribute) for f in (lethe, floor, shape))
        table.add_row(
            label, ms(mine), ms(raw), f"{mine / raw:.1f}x", ms(bare), f"{mine / bare:.1f}x"
        )
    table.add_row(
        f"throughput, {result.concurrent} at once (/s)",
        f"{lethe.throughput:.1f}",
        f"{floor.throughput:.1f}",
        f"{lethe.throughput / floor.throughput:.3f}x",
        f"{shape.throughput:.1f}",
        f"{lethe.throughput / shape.throughput:.2f}x",
    )
    console.print(table)
    if result.lethe_polled_p50 is not None and result.lethe_polled_p95 is not None:
        console.print(
            f"status-query view of the latency run (first waiting_window seen, "
            f"{result.poll_ms:g} ms polls): p50 {ms(result.lethe_polled_p50)} ms, "
            f"p95 {ms(result.lethe_polled_p95)} ms"
        )
    console.print(
        f"latency p95 with {result.concurrent} at once: Lethe {ms(result.lethe_p95_under_load)} "
        f"ms, Temporal shape with no work {ms(result.orchestration_p95_under_load)} ms"
    )
    for phase, use in (
        ("Lethe, one at a time", result.cpu_one_at_a_time),
        ("Lethe, at once", result.cpu_at_once),
        ("Temporal shape, one at a time", result.cpu_orchestration_one_at_a_time),
        ("Temporal shape, at once", result.cpu_orchestration_at_once),
    ):
        if use is not None:
            each = ", ".join(f"{name} {value:.0f} ms" for name, value in use.ms_per_erasure.items())
            console.print(
                f"CPU per erasure, {phase}: {each}; machine busy {use.machine_busy:.0%} of "
                f"{use.cores} cores"
            )
    for label, met, measured in (
        (f"immediate phase p95 <= {ms(TARGET_P95)} ms", result.p95_met, f"{ms(lethe.p95)} ms"),
        (
            f">= {TARGET_RATE:.0f} erasures per second",
            result.throughput_met,
            f"{lethe.throughput:.1f}/s",
        ),
    ):
        verdict = "[green]met[/green]" if met else "[red]NOT met[/red]"
        console.print(f"target {label}: {verdict} ({measured})")
    share = f"Lethe reaches {lethe.throughput / shape.throughput:.0%} of it"
    ceiling = cpu_ceiling(result.cpu_orchestration_at_once)
    cpu_bound = (
        f"; at its CPU per erasure the {result.cpu_orchestration_at_once.cores} cores give at "
        f"most {ceiling:.1f}/s"
        if ceiling is not None and result.cpu_orchestration_at_once is not None
        else ""
    )
    if result.throughput_target_above_orchestration:
        console.print(
            f"[yellow]the {TARGET_RATE:.0f}/s target is above the orchestration floor "
            f"({shape.throughput:.1f}/s, Lethe's workflow shape with no work){cpu_bound}: "
            f"out of reach on this machine for that shape, whatever the activities do; "
            f"{share}[/yellow]"
        )
    else:
        console.print(
            f"the {TARGET_RATE:.0f}/s target is within the orchestration floor "
            f"({shape.throughput:.1f}/s, Lethe's workflow shape with no work){cpu_bound}: "
            f"reachable on this machine in principle; {share}"
        )
