"""What tests and benchmarks need to run Lethe against the real stack (`scripts/stack up`).

Neither production code nor a test suite: `tests/` and `bench/` both import it, and it imports
only `lethe` and the libraries. A benchmark run as a script (`python bench/erasure.py`) puts
the repository on `sys.path` first, as pytest does for the tests.
"""
