"""Benchmarks of Lethe on the running stack, each against a raw floor measured in the same run."""
