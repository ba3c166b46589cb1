"""The statistics the benchmarks print: percentiles, and bootstrap intervals for a mean."""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile, linearly interpolated between the closest ranks (NaN for none)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def mean_interval(values: Sequence[float], resamples: int = 10_000) -> tuple[float, float]:
    """A 95% confidence interval for the mean of `values` (percentile bootstrap, fixed seed)."""
    rng = random.Random(0)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]
