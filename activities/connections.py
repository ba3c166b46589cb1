"""Closing the connectors' shared clients when a worker, or a test session, ends."""

from __future__ import annotations

from lethe.activities import blob, cache, sql


async def close_connections() -> None:
    """Close the shared SQL engines and the running event loop's Redis and blob clients."""
    await sql.dispose_engines()
    await cache.close_clients()
    await blob.close_clients()
