"""The retention benchmark's parts: the sessions table, the raw floor, Lethe's sweep, where the
time goes, and the result."""
