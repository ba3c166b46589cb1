"""The kernel: errors, settings, regions, YAML loading, durations, subject references, probes."""
