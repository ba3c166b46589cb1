"""Evidence: Lethe's store, the audit ledger, legal holds, the forget-list and audit review."""
