"""The revisions of the key store (KEK versions and state, data keys, codec keys, shreddings).

One module per change, each naming the revision before it; `lethe.kernel.migrations` runs them
and records the key store's revision in `lethe_keys_version`. Never edit a revision once
released: add the next one, and change the tables in `lethe.keys.store` to match.
"""
