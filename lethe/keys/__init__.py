"""Keys: the key store, KEK versions, the per-subject key service, sealing, rotation contracts."""
