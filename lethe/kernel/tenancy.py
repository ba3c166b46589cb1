"""The tenant scope of the code running now: whose rows of Lethe's store it may see.

No scope (None) is trusted internal code, such as the workers: it sees every row. The API runs
each request under `scoped(tenant)`, or `scoped(ALL)` for a principal of all tenants. Under a
tenant's scope the store's reads keep that tenant's rows only (`lethe.evidence.store.visible`),
and on PostgreSQL each transaction sets `lethe.tenant`, which row-level security checks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

ALL = "*"
"""The scope of every tenant's rows (an auditor's, an admin's)."""

_scope: ContextVar[str | None] = ContextVar("lethe_tenant_scope", default=None)


def current() -> str | None:
    """The scope now: a tenant, ALL, or None (no scope: trusted internal code)."""
    return _scope.get()


@contextmanager
def scoped(tenant: str) -> Iterator[str]:
    """Run the block under `tenant`'s scope (or ALL's), the previous scope back after it."""
    if not tenant:
        raise ValueError("a tenant scope needs a tenant (or tenancy.ALL)")
    token = _scope.set(tenant)
    try:
        yield tenant
    finally:
        _scope.reset(token)


def tenant_only() -> str | None:
    """The one tenant the scope keeps to; None under ALL or no scope."""
    scope = _scope.get()
    return None if scope in (None, ALL) else scope
