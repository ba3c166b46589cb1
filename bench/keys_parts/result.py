"""The key-service benchmark's result: what `--json` writes, and the table and verdicts."""

from __future__ import annotations

import statistics

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from bench.keys_parts.codec_cost import CodecCost
from bench.keys_parts.per_value import PerValue

TARGET_REWRAP_RATIO = 0.5
TARGET_CODEC_COST = 0.05


class Result(BaseModel):
    """What `--json` writes."""

    per_value: PerValue
    deks: int
    rewrap_lethe_per_s: float
    rewrap_floor_per_s: float
    codec: CodecCost
    rewrap_met: bool
    codec_met: bool


def show(console: Console, result: Result) -> None:
    """The comparison table and the verdicts."""
    table = Table(title="Key service: Lethe against the raw floor")
    for heading in ("", "Lethe", "floor", "Lethe / floor"):
        table.add_column(heading, justify="right" if heading else "left")
    pv = result.per_value
    for label, lethe, floor in (
        ("encrypt, µs per value", pv.lethe_encrypt_us, pv.floor_encrypt_us),
        ("decrypt, µs per value", pv.lethe_decrypt_us, pv.floor_decrypt_us),
    ):
        table.add_row(label, f"{lethe:.1f}", f"{floor:.1f}", f"{lethe / floor:.1f}x")
    lethe_rewrap = result.rewrap_lethe_per_s
    table.add_row(
        f"rewrap, {result.deks} DEKs (/s)",
        f"{lethe_rewrap:.0f}",
        f"{result.rewrap_floor_per_s:.0f}",
        f"{lethe_rewrap / result.rewrap_floor_per_s:.2f}x",
    )
    codec = result.codec
    with_, without = statistics.median(codec.rates_with), statistics.median(codec.rates_without)
    table.add_row(
        f"workflows/s, codec on / off (median of {len(codec.rates_with)})",
        f"{with_:.1f}",
        f"{without:.1f}",
        f"{with_ / without:.3f}x",
    )
    console.print(table)
    cpu_with = statistics.median(codec.cpu_ms_with)
    console.print(
        f"codec bursts of {codec.workflows_per_burst} (/s), with: "
        f"{', '.join(f'{r:.1f}' for r in codec.rates_with)}; without: "
        f"{', '.join(f'{r:.1f}' for r in codec.rates_without)}.\n"
        f"CPU per workflow, this process and the server (median): with {cpu_with:.1f} ms, "
        f"without {statistics.median(codec.cpu_ms_without):.1f} ms, a cost of "
        f"{codec.cpu_cost:.1%} (mean over pairs). The codec itself: "
        f"{codec.codec_cpu_ms_per_workflow:.2f} ms per workflow, "
        f"{codec.codec_cpu_ms_per_workflow / cpu_with:.1%} of that CPU."
    )
    console.print(
        f"target codec cost <= {TARGET_CODEC_COST:.0%} (the upper end of the 95% interval): "
        f"{'met' if result.codec_met else 'NOT met'} ({codec.cost:.1%}, 95% interval "
        f"{codec.cost_low:.1%} to {codec.cost_high:.1%})"
    )
    console.print(
        f"target rotation >= {TARGET_REWRAP_RATIO:.0%} of floor: "
        f"{'met' if result.rewrap_met else 'NOT met'} "
        f"({lethe_rewrap / result.rewrap_floor_per_s:.0%})"
    )
