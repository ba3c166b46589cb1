"""Temporal's payload codec: encryption of every payload under the key service's ring."""
