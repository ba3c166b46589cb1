"""The parts of the bulk-erasure benchmark (`bench/bulk.py`)."""
