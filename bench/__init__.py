"""Benchmarks of Lethe on the running stack, each against a raw floor measured in the same run."""


class BenchError(Exception):
    """The benchmark could not run or measured an invalid run (a step failed, a timeout)."""
