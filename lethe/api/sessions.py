"""The console's sessions: a signed cookie holding the principal, an expiry and a CSRF token.

The cookie is `HttpOnly`, `SameSite=Strict` and `Secure` (unless LETHE_API_INSECURE_COOKIES, for
http://localhost). It is signed with HMAC-SHA256 under LETHE_API_SESSION_KEY (a fresh key per
start when unset). Any request that changes something must carry the session's CSRF token, in
the `X-CSRF-Token` header or a form's `csrf` field; a missing or wrong one is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from fastapi import Request, Response

from lethe.api.principals import Principal

SESSION_COOKIE = "lethe_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf"
SESSION_SECONDS = 8 * 3600


@dataclass(frozen=True)
class Session:
    """A signed-in console user."""

    principal: Principal
    csrf: str
    expires: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sessions:
    """Issues and reads the session cookie."""

    def __init__(self, key: bytes | None, *, secure: bool) -> None:
        self._key = key or secrets.token_bytes(32)
        self.secure = secure

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self._key, body.encode(), hashlib.sha256).digest())

    def issue(self, response: Response, principal: Principal) -> Session:
        """Start a session for `principal`: sets the cookie on `response`."""
        session = Session(principal, secrets.token_urlsafe(24), time.time() + SESSION_SECONDS)
        fields = {
            "n": principal.name,
            "r": principal.role,
            "t": principal.tenant,
            "c": session.csrf,
            "e": session.expires,
        }
        body = _b64(json.dumps(fields, separators=(",", ":")).encode())
        response.set_cookie(
            SESSION_COOKIE,
            f"{body}.{self._sign(body)}",
            max_age=SESSION_SECONDS,
            httponly=True,
            secure=self.secure,
            samesite="strict",
            path="/",
        )
        return session

    def end(self, response: Response) -> None:
        """End the session: the cookie is cleared."""
        response.delete_cookie(
            SESSION_COOKIE, path="/", httponly=True, secure=self.secure, samesite="strict"
        )

    def read(self, cookie: str) -> Session | None:
        """The session of a cookie, if its signature holds and it has not expired."""
        body, _, signature = cookie.partition(".")
        if not hmac.compare_digest(self._sign(body), signature):
            return None
        try:
            fields = json.loads(_unb64(body))
            principal = Principal(
                name=fields["n"], role=fields["r"], tenant=fields["t"], source="session"
            )
            session = Session(principal, str(fields["c"]), float(fields["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        return session if session.expires > time.time() else None

    @staticmethod
    async def csrf_ok(session: Session, request: Request) -> bool:
        """True if the request carries the session's CSRF token (header or form field)."""
        presented = request.headers.get(CSRF_HEADER)
        if presented is None and request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")
        ):
            value = (await request.form()).get(CSRF_FIELD)
            presented = value if isinstance(value, str) else None
        return presented is not None and hmac.compare_digest(presented, session.csrf)
