"""The console's sign-in through OpenID Connect: the authorization-code flow with PKCE.

`/console/oidc/login` sends the browser to the issuer's authorization endpoint (from its
`/.well-known/openid-configuration`) with a fresh state, nonce and PKCE challenge (S256); the
three travel in a short-lived cookie, encrypted and authenticated (AES-GCM under a key derived
from LETHE_API_SESSION_KEY), so any server of a deployment can finish the flow and only the
browser that started it can. `/console/oidc/callback` checks the state, exchanges the code at
the token endpoint (client secret by HTTP Basic when configured, and the PKCE verifier),
verifies the ID token (signature by the JWKS, issuer, audience = client id, lifetime, nonce),
maps its claims to a principal as for bearer tokens, and starts a console session. A flow is
used once. Any failure answers a plain page saying sign-in failed; why is logged as a category.

The callback answers a page that moves on to `/console` (a meta refresh), not a 303: when the
user signed in on the issuer's own form, the navigation back is the issuer's (cross-site), so a
redirect would reach `/console` without the SameSite=Strict session cookie and show the sign-in
page again (tests/browser/test_oidc_sign_in.py); the page's own navigation is same-site.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Annotated, Any
from urllib.parse import quote_plus, urlencode

import aiohttp
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from lethe.api.auth import Authenticator
from lethe.api.oidc import OidcVerifier, TokenRefused, fetch_json
from lethe.api.principals import Principal

router = APIRouter(prefix="/console/oidc", include_in_schema=False)
FLOW_COOKIE = "lethe_oidc"
FLOW_SECONDS = 600
CALLBACK_PATH = "/console/oidc/callback"
CONSOLE_PATH = "/console"
log = logging.getLogger("lethe.api.oidc")

FAILED_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sign-in failed · Lethe</title>
<link rel="stylesheet" href="/static/lethe.css"></head>
<body><main><h1>Sign-in failed</h1>
<p>{message}</p>
<p><a href="/console/sign-in">Back to the sign-in page</a></p></main></body></html>
"""
SIGNED_IN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Signed in · Lethe</title>
<meta http-equiv="refresh" content="0;url=/console">
<link rel="stylesheet" href="/static/lethe.css"></head>
<body><main><p>Signed in. <a href="/console">Continue to the console</a>.</p></main></body>
</html>
"""


class HideCallbackQuery(logging.Filter):
    """Keeps the callback's code and state out of uvicorn's access log (the path stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the access line's path argument when it is the callback's."""
        args = record.args
        path = args[2] if isinstance(args, tuple) and len(args) > 2 else None
        if isinstance(args, tuple) and isinstance(path, str) and path.startswith(CALLBACK_PATH):
            record.args = (*args[:2], CALLBACK_PATH, *args[3:])
        return True


def hide_callback_query(logger: logging.Logger) -> None:
    """Install `HideCallbackQuery` on `logger` once."""
    if not any(isinstance(found, HideCallbackQuery) for found in logger.filters):
        logger.addFilter(HideCallbackQuery())


hide_callback_query(logging.getLogger("uvicorn.access"))


class SignInFailed(Exception):
    """A sign-in that cannot finish; the message is a category, never a token or a claim."""


@dataclass(frozen=True)
class Flow:
    """One sign-in under way: what the callback must see again."""

    state: str
    nonce: str
    verifier: str
    expires: float


@dataclass(frozen=True)
class Endpoints:
    """The issuer's endpoints the flow uses."""

    authorization: str
    token: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def challenge_of(verifier: str) -> str:
    """PKCE's S256 challenge of a code verifier."""
    return _b64(hashlib.sha256(verifier.encode()).digest())


class CodeFlow:
    """The console's client at the issuer."""

    def __init__(self, verifier: OidcVerifier, key: bytes | None) -> None:
        settings = verifier.settings
        if settings.oidc_client_id is None:
            raise ValueError("OIDC sign-in needs LETHE_OIDC_CLIENT_ID")
        self.verifier = verifier
        self.client_id = settings.oidc_client_id
        self._secret = settings.oidc_client_secret
        self.scopes = settings.oidc_scopes
        self.secure = not settings.api_insecure_cookies
        self.redirect_url = settings.oidc_redirect_url or (
            settings.api_public_url.rstrip("/") + CALLBACK_PATH if settings.api_public_url else None
        )
        derived = HKDF(hashes.SHA256(), 32, salt=None, info=b"lethe console oidc flow")
        self._aead = AESGCM(derived.derive(key or secrets.token_bytes(32)))
        self._endpoints: Endpoints | None = None
        self._asked_at = float("-inf")
        self._used: dict[str, float] = {}

    async def endpoints(self) -> Endpoints:
        """The authorization and token endpoints, from the issuer's discovery document (asked
        again after a failure only once the refetch interval has passed)."""
        if self._endpoints is None:
            if time.monotonic() - self._asked_at < self.verifier.keys.refetch_after:
                raise SignInFailed("the discovery document was not fetched a moment ago")
            self._asked_at = time.monotonic()
            url = self.verifier.issuer.rstrip("/") + "/.well-known/openid-configuration"
            document = await fetch_json(url)
            if not isinstance(document, dict) or document.get("issuer") != self.verifier.issuer:
                raise SignInFailed("the discovery document names another issuer")
            found = document.get("authorization_endpoint"), document.get("token_endpoint")
            if not all(isinstance(u, str) and u.startswith(("https://", "http://")) for u in found):
                raise SignInFailed("the discovery document lacks the endpoints")
            if document.get("jwks_uri", self.verifier.keys.url) != self.verifier.keys.url:
                log.warning("the issuer publishes its keys elsewhere than LETHE_OIDC_JWKS_URL")
            self._endpoints = Endpoints(str(found[0]), str(found[1]))
        return self._endpoints

    def seal(self, flow: Flow) -> str:
        """The flow as the cookie's value: encrypted and authenticated."""
        nonce = secrets.token_bytes(12)
        sealed = self._aead.encrypt(nonce, json.dumps(asdict(flow)).encode(), FLOW_COOKIE.encode())
        return _b64(nonce + sealed)

    def open(self, cookie: str | None) -> Flow | None:
        """The flow of a cookie this server sealed and that has not expired, else None."""
        if not cookie:
            return None
        try:
            raw = _unb64(cookie)
            flow = Flow(**json.loads(self._aead.decrypt(raw[:12], raw[12:], FLOW_COOKIE.encode())))
        except (InvalidTag, ValueError, TypeError):
            return None
        return flow if flow.expires > time.time() else None

    def start(self) -> Flow:
        """A new sign-in: fresh state, nonce and PKCE verifier."""
        return Flow(
            state=secrets.token_urlsafe(32),
            nonce=secrets.token_urlsafe(32),
            verifier=secrets.token_urlsafe(64),
            expires=time.time() + FLOW_SECONDS,
        )

    async def authorization_url(self, flow: Flow, redirect_url: str) -> str:
        """Where to send the browser to sign in."""
        query = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": redirect_url,
            "scope": self.scopes,
            "state": flow.state,
            "nonce": flow.nonce,
            "code_challenge": challenge_of(flow.verifier),
            "code_challenge_method": "S256",
        }
        endpoint = (await self.endpoints()).authorization
        return f"{endpoint}{'&' if '?' in endpoint else '?'}{urlencode(query)}"

    def use(self, flow: Flow) -> None:
        """Mark a flow used; a second use (a replayed cookie) is refused."""
        now = time.time()
        self._used = {state: until for state, until in self._used.items() if until > now}
        if flow.state in self._used:
            raise SignInFailed("the sign-in was already used")
        self._used[flow.state] = flow.expires

    async def finish(self, flow: Flow, code: str, redirect_url: str) -> Principal:
        """Exchange the code, verify the ID token, and return its principal."""
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_url,
            "code_verifier": flow.verifier,
            "client_id": self.client_id,
        }
        headers = {"Accept": "application/json"}
        if self._secret is not None:  # RFC 6749 2.3.1: both form-encoded, then Basic
            secret = quote_plus(self._secret.get_secret_value())
            headers["Authorization"] = aiohttp.encode_basic_auth(quote_plus(self.client_id), secret)
        try:
            answer = await fetch_json((await self.endpoints()).token, data=form, headers=headers)
        except TokenRefused:
            raise SignInFailed("the token endpoint refused the code") from None
        id_token = answer.get("id_token") if isinstance(answer, dict) else None
        if not isinstance(id_token, str):
            raise SignInFailed("the token endpoint sent no ID token")
        claims = await self.verifier.claims(id_token, audience=self.client_id, required=("nonce",))
        self._check_id_claims(claims, flow)
        return self.verifier.principal_of(claims)

    def _check_id_claims(self, claims: dict[str, Any], flow: Flow) -> None:
        """OpenID Connect Core 3.1.3.7: the nonce is the flow's; `azp` names us if present."""
        nonce = claims.get("nonce")
        if not isinstance(nonce, str) or not hmac.compare_digest(nonce, flow.nonce):
            raise SignInFailed("the ID token's nonce is not the sign-in's")
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        azp = claims.get("azp")
        if (len(audiences) > 1 or azp is not None) and azp != self.client_id:
            raise SignInFailed("the ID token was issued to another client")


def _code_flow(request: Request) -> CodeFlow | None:
    """The application's code flow (made on first use), or None when OIDC sign-in is off."""
    found: CodeFlow | None = getattr(request.app.state, "oidc_code_flow", None)
    if found is not None:
        return found
    auth: Authenticator = request.app.state.auth
    if auth.oidc is None or auth.oidc.settings.oidc_client_id is None:
        return None
    key = auth.oidc.settings.api_session_key
    found = CodeFlow(auth.oidc, base64.b64decode(key.get_secret_value()) if key else None)
    request.app.state.oidc_code_flow = found
    return found


def _redirect_url(flow: CodeFlow, request: Request) -> str:
    return flow.redirect_url or str(request.url_for("oidc_callback"))


def failed_page(message: str, status: int = 400) -> HTMLResponse:
    """A plain page: sign-in failed (the message is fixed text, never request content)."""
    return HTMLResponse(FAILED_PAGE.format(message=message), status_code=status)


@router.get("/login", name="oidc_login")
async def login(request: Request) -> Response:
    """Start a sign-in: to the issuer's authorization endpoint, with the flow in a cookie."""
    code_flow = _code_flow(request)
    if code_flow is None:
        return failed_page("Sign-in through OpenID Connect is not configured here.", 404)
    flow = code_flow.start()
    try:
        target = await code_flow.authorization_url(flow, _redirect_url(code_flow, request))
    except (SignInFailed, TokenRefused) as error:
        log.warning("OIDC sign-in could not start: %s", error)
        return failed_page("The identity provider cannot be reached. Try again later.", 502)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        FLOW_COOKIE,
        code_flow.seal(flow),
        max_age=FLOW_SECONDS,
        path=CALLBACK_PATH,
        httponly=True,
        secure=code_flow.secure,
        samesite="lax",  # the issuer's redirect back is a cross-site navigation
    )
    return response


@router.get("/callback", name="oidc_callback")
async def callback(
    request: Request,
    code: Annotated[str | None, Query(max_length=4096)] = None,
    state: Annotated[str | None, Query(max_length=512)] = None,
    error: Annotated[str | None, Query(max_length=256)] = None,
) -> Response:
    """Finish a sign-in: check the state, exchange the code, start a console session."""
    code_flow = _code_flow(request)
    if code_flow is None:
        return failed_page("Sign-in through OpenID Connect is not configured here.", 404)
    auth: Authenticator = request.app.state.auth
    try:
        principal = await _finish(code_flow, request, code, state, error)
    except (SignInFailed, TokenRefused) as refused:
        log.info("OIDC sign-in refused: %s", refused)
        address = request.client.host if request.client else "-"
        await asyncio.sleep(auth.failures.delay(address))
        auth.failures.failed(address)
        response: Response = failed_page("The identity provider's answer was not accepted.")
    else:
        response = HTMLResponse(SIGNED_IN_PAGE)
        auth.sessions.issue(response, principal)
    response.delete_cookie(
        FLOW_COOKIE, path=CALLBACK_PATH, httponly=True, secure=code_flow.secure, samesite="lax"
    )
    return response


async def _finish(
    code_flow: CodeFlow, request: Request, code: str | None, state: str | None, error: str | None
) -> Principal:
    flow = code_flow.open(request.cookies.get(FLOW_COOKIE))
    if flow is None:
        raise SignInFailed("no sign-in under way in this browser (or it expired)")
    if state is None or not hmac.compare_digest(state, flow.state):
        raise SignInFailed("the state is not the sign-in's")
    code_flow.use(flow)
    if error is not None or not code:
        raise SignInFailed("the identity provider sent no code")
    return await code_flow.finish(flow, code, _redirect_url(code_flow, request))
