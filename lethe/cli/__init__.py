"""The `lethe` command line."""
