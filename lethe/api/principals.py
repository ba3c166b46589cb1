"""Who may do what: principals, their roles and tenants, and the one table of grants.

Every endpoint names the action it performs; `Principal.may` answers from `GRANTS`. Tenancy is
separate: a principal with a tenant sees only that tenant's objects, and the API answers 404 for
the others' (`Principal.sees`), so their existence does not leak.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lethe.evidence.tokens import Role
from lethe.kernel.tenancy import ALL

Action = Literal[
    "erasure.submit",
    "erasure.read",
    "erasure.decide",
    "certificate.read",
    "holds.read",
    "holds.write",
    "ledger.read",
    "subjects.lookup",
    "forget.read",
    "keys.read",
    "retention.read",
    "tokens.manage",
]

GRANTS: dict[Role, frozenset[Action]] = {
    "dpo": frozenset(
        {
            "erasure.submit",
            "erasure.read",
            "erasure.decide",
            "certificate.read",
            "holds.read",
            "holds.write",
            "ledger.read",
            "subjects.lookup",
            "forget.read",
            "retention.read",
        }
    ),
    "auditor": frozenset(
        {
            "erasure.read",
            "certificate.read",
            "holds.read",
            "ledger.read",
            "subjects.lookup",
            "forget.read",
            "keys.read",
            "retention.read",
        }
    ),
    # A service submits and follows the requests it submitted, nothing else.
    "service": frozenset({"erasure.submit", "erasure.read", "certificate.read"}),
    "admin": frozenset({"tokens.manage", "keys.read"}),
}


@dataclass(frozen=True)
class Principal:
    """Who is calling: a name (for the ledger), a role, and the tenant acted for."""

    name: str
    role: Role
    tenant: str | None
    """None: all tenants (an auditor's or an admin's)."""
    source: Literal["token", "oidc", "session"]

    def may(self, action: Action) -> bool:
        """True if the role grants the action."""
        return action in GRANTS[self.role]

    def sees(self, tenant: str | None) -> bool:
        """True if an object of `tenant` (None: of no one tenant) is visible to this principal."""
        return self.tenant is None or tenant == self.tenant

    @property
    def scope(self) -> str:
        """The store's tenant scope for this principal's requests."""
        return self.tenant or ALL

    @property
    def only_own(self) -> bool:
        """A service sees only the requests it submitted."""
        return self.role == "service"
