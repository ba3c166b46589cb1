"""The API benchmark's result: each measurement's figures, the targets, what `--json` writes,
and the table and verdicts it prints."""

from __future__ import annotations

import statistics

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from bench.api_parts.load import Load
from bench.harness.report import ms
from bench.harness.stats import percentile

TARGET_STATUS_P95 = 0.050
"""Status p95, seconds."""
TARGET_STATUS_RATIO = 3.0
"""Status p95 over the bare endpoint's p95, at most."""
TARGET_AUDIT_P95 = 0.100
"""Audit query p95, seconds."""
WHAT_IF = "what-if: not Lethe's code today"


class Row(BaseModel):
    """One measurement: what was asked, how often, how fast, and the CPU it took."""

    name: str
    clients: int
    interval_ms: float
    """Each client's pace; 0: back to back (always one request in flight)."""
    answers: int
    rate: float
    p50: float
    p95: float
    p99: float
    max: float
    failures: dict[str, int]
    seconds: float
    """The counted window."""
    cpu_cores: dict[str, float]
    """CPU used in the window, in cores (1.0: one core all the time), by process."""
    machine_busy: float | None

    @classmethod
    def of(cls, name: str, clients: int, interval: float, load: Load) -> Row:
        """The figures of one load."""
        cpu = load.cpu
        return cls(
            name=name,
            clients=clients,
            interval_ms=interval * 1000,
            answers=len(load.latencies),
            rate=load.rate,
            p50=load.p(50),
            p95=load.p(95),
            p99=load.p(99),
            max=max(load.latencies, default=float("nan")),
            failures=dict(load.failures),
            seconds=load.seconds,
            cpu_cores={k: v / load.seconds for k, v in cpu.seconds.items()} if cpu else {},
            machine_busy=cpu.machine_busy if cpu else None,
        )


class Verdict(BaseModel):
    """A target, the figure measured, and whether it is met."""

    target: str
    measured: str
    met: bool
    counts: bool = True
    """False for a what-if (a change not yet made): shown, not part of the run's verdict."""


class Result(BaseModel):
    """What `--json` writes."""

    rows: list[Row]
    verdicts: list[Verdict]
    seeded_entries: int | None = None
    seed_seconds: float | None = None
    seed_reused: bool | None = None
    audit_plan: str | None = None
    breakdown: dict[str, dict[str, float]] | None = None
    """A status read's layers, one at a time: name -> mean, p50, p95 (seconds)."""

    @property
    def met(self) -> bool:
        """Every target met (what-ifs aside)."""
        return all(v.met for v in self.verdicts if v.counts)


def percentiles(values: list[float]) -> dict[str, float]:
    """Mean, p50 and p95 of durations, seconds."""
    return {
        "mean": statistics.fmean(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
    }


def status_verdicts(status: Row, bare: Row) -> list[Verdict]:
    """The status targets for one pace (what-ifs unless it is the status read as built)."""
    pace = "back to back" if not status.interval_ms else f"every {status.interval_ms:.0f} ms"
    ratio = status.p95 / bare.p95
    what_if = status.name != "status"
    tag = f" ({WHAT_IF})" if what_if else ""
    return [
        Verdict(
            target=f"{status.name} p95 <= 50 ms ({status.clients} clients, {pace}){tag}",
            measured=f"{ms(status.p95)} ms",
            met=status.p95 <= TARGET_STATUS_P95,
            counts=not what_if,
        ),
        Verdict(
            target=f"{status.name} p95 <= 3x bare p95 ({pace}){tag}",
            measured=f"{ratio:.1f}x ({ms(status.p95)} / {ms(bare.p95)} ms)",
            met=ratio <= TARGET_STATUS_RATIO,
            counts=not what_if,
        ),
    ]


def audit_verdict(audit: Row) -> Verdict:
    """The audit query's target for one pace (a what-if unless it is the query as built)."""
    pace = "back to back" if not audit.interval_ms else f"every {audit.interval_ms:.0f} ms"
    what_if = audit.name != "audit"
    return Verdict(
        target=f"{audit.name} p95 <= 100 ms ({audit.clients} clients, {pace})"
        + (f" ({WHAT_IF})" if what_if else ""),
        measured=f"{ms(audit.p95)} ms",
        met=audit.p95 <= TARGET_AUDIT_P95,
        counts=not what_if,
    )


def show(console: Console, result: Result) -> None:
    """The figures, the CPU, and the verdicts."""
    table = Table(
        title="API benchmark",
        caption=(
            "status: GET /v1/erasures/{id}; bare: a FastAPI route answering a constant; audit: "
            "GET /v1/ledger?tenant&action&since&until, first page; audit floor: its SQL through "
            "psycopg. Latency from the request sent to its body read."
        ),
    )
    table.add_column("measurement")
    table.add_column("clients", justify="right")
    table.add_column("pace", justify="right")  # "-": back to back
    for heading in ("answers", "per s", "p50 ms", "p95 ms", "p99 ms", "max ms", "failures"):
        table.add_column(heading, justify="right")
    for row in result.rows:
        table.add_row(
            row.name,
            str(row.clients),
            "-" if not row.interval_ms else f"{row.interval_ms:.0f} ms",
            str(row.answers),
            f"{row.rate:.0f}",
            ms(row.p50),
            ms(row.p95),
            ms(row.p99),
            ms(row.max),
            ", ".join(f"{k}: {v}" for k, v in row.failures.items()) or "0",
        )
    console.print(table)
    cpu = Table(
        title="CPU per answer (ms), by process, in each measurement's window",
        caption="the machine has 2 cores, shared with whatever else ran (its busy share)",
    )
    cpu.add_column("measurement")
    cpu.add_column("pace", justify="right")
    names = list(dict.fromkeys(name for row in result.rows for name in row.cpu_cores))
    for name in [*names, "machine busy"]:
        cpu.add_column(name, justify="right")
    for row in result.rows:
        per_answer = row.seconds / row.answers * 1000 if row.answers else float("nan")
        cells = [
            f"{row.cpu_cores[n] * per_answer:.2f}" if n in row.cpu_cores else "" for n in names
        ]
        busy = f"{row.machine_busy:.0%}" if row.machine_busy is not None else ""
        pace = "-" if not row.interval_ms else f"{row.interval_ms:.0f} ms"
        cpu.add_row(f"{row.name} ({row.clients})", pace, *cells, busy)
    console.print(cpu)
    if result.seeded_entries is not None:
        how = "kept from an earlier run (--keep), seeded in" if result.seed_reused else "seeded in"
        console.print(
            f"ledger: {result.seeded_entries:,} entries, {how} {result.seed_seconds:.0f} s "
            "(hashes do not chain: the query never reads them, and no chain check was made)"
        )
    for verdict in result.verdicts:
        mark = "[green]met[/green]" if verdict.met else "[red]missed[/red]"
        mark = mark if verdict.counts else f"({mark})"
        console.print(f"{mark}  {verdict.target}: {verdict.measured}")
