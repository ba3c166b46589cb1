"""The API's database role on PostgreSQL: what it may read and write in Lethe's store.

The API connects as a role of its own, without BYPASSRLS, so row-level security keeps each
tenant's rows to that tenant (`lethe.kernel.tenancy`). The operator makes the role
(`CREATE ROLE lethe_api LOGIN PASSWORD ... NOBYPASSRLS`); `grant_api` grants it reading every
table of the store and writing only the ledger, its head, the holds and the API tokens.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from lethe.evidence import store
from lethe.kernel.errors import LetheError

WRITTEN = {
    # The ledger is append-only: the API inserts entries, and never updates one.
    "lethe_ledger": "INSERT",
    "lethe_ledger_head": "INSERT, UPDATE",
    "lethe_holds": "INSERT, UPDATE",
    "lethe_api_tokens": "INSERT, UPDATE",
}
"""What the API role writes, beside reading every table of the store."""


class RoleRefused(LetheError):
    """The API role cannot be granted: no such role, one that bypasses row-level security, or a
    database without it."""


async def grant_api(conn: AsyncConnection, role: str) -> list[str]:
    """Grant `role` the API's rights on the store's tables (at their head already); the grants
    made, as statements. Refused on SQLite, for a role that does not exist, and for one that
    bypasses row-level security (a superuser, or BYPASSRLS)."""
    check_dialect(conn.dialect.name)
    await _check(conn, role)
    quoted = conn.dialect.identifier_preparer.quote(role)
    read = sorted([*store.metadata.tables, store.schema.version_table])
    statements = [f"GRANT SELECT ON {', '.join(read)} TO {quoted}"]
    statements += [f"GRANT {rights} ON {table} TO {quoted}" for table, rights in WRITTEN.items()]
    for statement in statements:
        await conn.exec_driver_sql(statement)
    return statements


def check_dialect(dialect: str) -> None:
    """Refuse a database other than PostgreSQL (no roles, no row-level security)."""
    if dialect != "postgresql":
        raise RoleRefused(
            f"an API role is for PostgreSQL, and Lethe's store is on {dialect}: there the API "
            "and the workers share the database, and tenants are kept apart by the application"
        )


async def _check(conn: AsyncConnection, role: str) -> None:
    """Refuse a role that does not exist or that row-level security would not hold."""
    found = (
        await conn.execute(
            text("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = :role"),
            {"role": role},
        )
    ).first()
    if found is None:
        raise RoleRefused(
            f"no role {role[:63]!r} in this database: make it first "
            f"(CREATE ROLE {role[:63]} LOGIN PASSWORD '...' NOBYPASSRLS)"
        )
    if found.rolsuper or found.rolbypassrls:
        what = "a superuser" if found.rolsuper else "a role with BYPASSRLS"
        raise RoleRefused(
            f"{role[:63]!r} is {what}: row-level security would not keep tenants apart for it; "
            f"use a role without (ALTER ROLE {role[:63]} NOSUPERUSER NOBYPASSRLS)"
        )
