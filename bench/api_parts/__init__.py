"""The API benchmark's parts: the servers it runs, the load it sends, the seeded ledger, the
result it prints (`bench/api.py` is the wiring)."""
