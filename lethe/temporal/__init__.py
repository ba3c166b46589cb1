"""Temporal plumbing: the connection, search attributes, histories and the embedded dev server."""
