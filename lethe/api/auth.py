"""Who is calling: an API token, an OIDC bearer token, or the console's session cookie.

Every endpoint depends on `require(action)`: it finds the principal (401 when there is none),
checks the role's grant (403), and runs the endpoint under the principal's tenant scope, so
Lethe's store shows it only its tenant's rows (row-level security on PostgreSQL, the same filter
in the application layer everywhere). Failed sign-ins from one address are slowed down.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncEngine

from lethe.api.kept import Kept
from lethe.api.oidc import OidcVerifier
from lethe.api.principals import Action, Principal
from lethe.api.problems import ProblemError
from lethe.api.sessions import SESSION_COOKIE, Sessions
from lethe.evidence import tokens
from lethe.kernel import tenancy

FAILURE_WINDOW_SECONDS = 300.0
FIRST_DELAY_SECONDS = 0.25
MAX_DELAY_SECONDS = 4.0
TOKEN_KEPT_SECONDS = 5.0
"""How long a checked API token's answer is kept (a revocation through this server is at once)."""
_bearer = HTTPBearer(auto_error=False, description="an API token (lethe tokens create) or OIDC")


def unauthorized(detail: str) -> ProblemError:
    """401 with the challenge for a bearer token."""
    return ProblemError(
        401, "Unauthorized", detail, headers={"WWW-Authenticate": 'Bearer realm="lethe"'}
    )


class FailedSignIns:
    """Recent failures per client address; each one more doubles the wait before answering."""

    def __init__(self) -> None:
        self._seen: dict[str, deque[float]] = defaultdict(deque)

    def _recent(self, address: str) -> deque[float]:
        seen = self._seen[address]
        while seen and time.monotonic() - seen[0] > FAILURE_WINDOW_SECONDS:
            seen.popleft()
        return seen

    def delay(self, address: str) -> float:
        """How long to wait before answering this address's next failure."""
        failures = len(self._recent(address))
        if failures == 0:
            return 0.0
        return float(min(FIRST_DELAY_SECONDS * 2 ** (failures - 1), MAX_DELAY_SECONDS))

    def failed(self, address: str) -> None:
        """Count a failure."""
        self._recent(address).append(time.monotonic())


class Authenticator:
    """Finds the principal of a request from its bearer token or session cookie."""

    def __init__(self, store: AsyncEngine, sessions: Sessions, oidc: OidcVerifier | None) -> None:
        self.store = store
        self.sessions = sessions
        self.oidc = oidc
        self.failures = FailedSignIns()
        self.checked: Kept[Principal | None] = Kept(TOKEN_KEPT_SECONDS)

    async def from_secret(self, presented: str) -> Principal | None:
        """The principal a presented token stands for (an API token or an OIDC JWT). An API
        token's answer is kept TOKEN_KEPT_SECONDS: a revocation elsewhere takes that long."""
        if tokens.looks_like_token(presented):
            digest = hashlib.sha256(presented.encode()).hexdigest()
            return await self.checked.get(digest, lambda: self._api_token(presented))
        if self.oidc is not None and self.oidc.looks_like_jwt(presented):
            return await self.oidc.principal(presented)
        # Not a token's shape: compare anyway, so the answer takes as long as for a token.
        await tokens.authenticate(self.store, presented)
        return None

    async def _api_token(self, presented: str) -> Principal | None:
        token = await tokens.authenticate(self.store, presented)
        if token is None:
            return None
        return Principal(name=token.name, role=token.role, tenant=token.tenant, source="token")

    async def refuse(self, request: Request, title: str) -> ProblemError:
        """401 after the address's wait; counts the failure."""
        address = request.client.host if request.client else "-"
        await asyncio.sleep(self.failures.delay(address))
        self.failures.failed(address)
        return unauthorized(title)


async def principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller; 401 without valid credentials."""
    auth: Authenticator = request.app.state.auth
    if credentials is not None:
        found = await auth.from_secret(credentials.credentials)
        if found is None:
            raise await auth.refuse(request, "the bearer token is not valid (or expired)")
        return found
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie is not None:
        session = auth.sessions.read(cookie)
        if session is None:
            raise await auth.refuse(request, "the session ended: sign in again")
        if request.method not in ("GET", "HEAD") and not await auth.sessions.csrf_ok(
            session, request
        ):
            raise ProblemError(403, "Forbidden", "the CSRF token is missing or wrong")
        return session.principal
    # No credentials guess nothing: refused at once, not counted (a probe or a first visit from
    # a shared address must not slow down the next user's mistyped token).
    raise unauthorized("sign in: send `Authorization: Bearer <token>`")


def require(action: Action) -> Callable[..., Any]:
    """A dependency: the principal, if its role grants `action`; the endpoint runs under its
    tenant scope."""

    async def granted(
        found: Annotated[Principal, Depends(principal)],
    ) -> AsyncIterator[Principal]:
        if not found.may(action):
            raise ProblemError(403, "Forbidden", f"the {found.role} role may not {action}")
        with tenancy.scoped(found.scope):
            yield found

    return granted
