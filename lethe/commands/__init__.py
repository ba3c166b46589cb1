"""The `lethe` command line's command groups, assembled in `lethe.cli`."""
