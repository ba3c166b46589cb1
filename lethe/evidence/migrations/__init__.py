"""The revisions of Lethe's store (ledger, ledger head, holds, forget-list, certificates).

One module per change, each naming the revision before it; `lethe.kernel.migrations` runs them
and records the store's revision in `lethe_store_version`. Never edit a revision once released:
add the next one, and change the tables in `lethe.evidence.store` to match.
"""
