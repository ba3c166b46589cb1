"""A small OpenID Connect provider for the tests: real keys, real HTTP, real checks.

It serves the discovery document, its JWKS, an authorization endpoint that signs the user in at
once (redirecting back with a code), and a token endpoint that checks the client's secret, the
redirect URL, PKCE (S256) and that a code is used once. Keys are RSA (or EC) pairs made with
`cryptography`; `rotate()` publishes a new key and signs with it. The tests sign tokens of any
shape with `sign()`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import jwt
import uvicorn
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from pydantic import SecretStr

from lethe.api.app import create_app
from lethe.kernel.config import Settings

CLIENT_ID = "lethe-console"
CLIENT_SECRET = "console-secret-5e1f"
AUDIENCE = "lethe-api"


@dataclass
class Key:
    """A signing key pair and its key id."""

    kid: str
    private: Any
    alg: str = "RS256"

    @classmethod
    def rsa(cls, kid: str) -> Key:
        """A fresh 2048-bit RSA key."""
        return cls(kid, rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @classmethod
    def ec(cls, kid: str) -> Key:
        """A fresh P-256 key."""
        return cls(kid, ec.generate_private_key(ec.SECP256R1()), "ES256")

    def jwk(self) -> dict[str, Any]:
        """The public half as a JWK."""
        public = self.private.public_key()
        algorithm = RSAAlgorithm if self.alg.startswith(("RS", "PS")) else ECAlgorithm
        found: dict[str, Any] = algorithm.to_jwk(public, as_dict=True)
        return found | {"kid": self.kid, "use": "sig", "alg": self.alg}


@dataclass
class Grant:
    """An authorization code and what it was issued for."""

    redirect_uri: str
    challenge: str
    nonce: str | None
    claims: dict[str, Any]


@dataclass
class Provider:
    """The provider: its keys, the codes it issued, and what the test wants it to do."""

    keys: list[Key] = field(default_factory=lambda: [Key.rsa("key-1")])
    base: str = ""
    claims: dict[str, Any] = field(default_factory=dict)
    """Claims the next sign-in's ID token carries (besides iss, aud, sub, iat, exp, nonce)."""
    interactive: bool = False
    """When set, the authorization endpoint shows a sign-in form first (as a real one does when
    the user has no session there), and the redirect back follows the form's POST."""
    nonce_override: str | None = None
    """When set, ID tokens carry this nonce instead of the one the client sent."""
    grants: dict[str, Grant] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    jwks_padding: int = 0
    """Bytes of filler in the JWKS document (an unknown member, as providers may add)."""
    jwks_fetches: int = 0
    token_requests: int = 0
    _runner: web.AppRunner | None = None

    @property
    def signing(self) -> Key:
        """The key tokens are signed with now (the newest)."""
        return self.keys[-1]

    def rotate(self, *, keep_old: bool = False) -> Key:
        """Publish a new key and sign with it; the old one stays published if `keep_old`."""
        new = Key.rsa(f"key-{len(self.keys) + 1}-{secrets.token_hex(2)}")
        self.keys = [*self.keys, new] if keep_old else [new]
        return new

    def sign(
        self,
        claims: dict[str, Any],
        *,
        key: Key | None = None,
        headers: dict[str, Any] | None = None,
        lifetime: int = 300,
    ) -> str:
        """A JWT with the standard claims (overridable by `claims`), signed by `key`."""
        key = key or self.signing
        now = int(time.time())
        body = {
            "iss": self.base,
            "aud": AUDIENCE,
            "sub": "user-7",
            "iat": now,
            "exp": now + lifetime,
        } | claims
        return jwt.encode(
            body, key.private, algorithm=key.alg, headers={"kid": key.kid} | (headers or {})
        )

    async def start(self, public_host: str = "127.0.0.1") -> None:
        """Serve on a free port of 127.0.0.1, known as `public_host` (its issuer's host)."""
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        app.router.add_get("/authorize", self._authorize)
        app.router.add_post("/authorize", self._authorize)
        app.router.add_post("/token", self._token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base = f"http://{public_host}:{port}"

    async def stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()

    async def _discovery(self, _: web.Request) -> web.Response:
        return web.json_response(
            {
                "issuer": self.base,
                "authorization_endpoint": f"{self.base}/authorize",
                "token_endpoint": f"{self.base}/token",
                "jwks_uri": f"{self.base}/jwks",
                "response_types_supported": ["code"],
                "code_challenge_methods_supported": ["S256"],
                "id_token_signing_alg_values_supported": ["RS256", "ES256"],
            }
        )

    async def _jwks(self, _: web.Request) -> web.Response:
        self.jwks_fetches += 1
        document: dict[str, Any] = {"keys": [key.jwk() for key in self.keys]}
        if self.jwks_padding:
            document["filler"] = "x" * self.jwks_padding
        return web.json_response(document)

    async def _authorize(self, request: web.Request) -> web.Response:
        if self.interactive and request.method == "GET":
            fields = "".join(
                f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
                for k, v in request.query.items()
            )
            return web.Response(
                content_type="text/html",
                text=f'<!doctype html><title>Provider</title><form method="post">{fields}'
                '<button type="submit">Sign in at the provider</button></form>',
            )
        sent = await request.post() if request.method == "POST" else request.query
        query = {name: value for name, value in sent.items() if isinstance(value, str)}
        if (
            query.get("client_id") != CLIENT_ID
            or query.get("response_type") != "code"
            or "openid" not in query.get("scope", "").split()
            or query.get("code_challenge_method") != "S256"
            or not query.get("code_challenge")
            or not query.get("redirect_uri")
        ):
            return web.Response(status=400, text="bad authorization request")
        code = secrets.token_urlsafe(24)
        self.grants[code] = Grant(
            query["redirect_uri"], query["code_challenge"], query.get("nonce"), dict(self.claims)
        )
        back = {"code": code, "state": query.get("state", "")}
        raise web.HTTPSeeOther(f"{query['redirect_uri']}?{urlencode(back)}")

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        form = await request.post()
        expected = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        if request.headers.get("Authorization") != f"Basic {expected}":
            return web.json_response({"error": "invalid_client"}, status=401)
        code = str(form.get("code", ""))
        grant = self.grants.pop(code, None)
        if grant is None or code in self.used:
            return web.json_response({"error": "invalid_grant"}, status=400)
        self.used.add(code)
        verifier = str(form.get("code_verifier", ""))
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        if (
            form.get("grant_type") != "authorization_code"
            or form.get("redirect_uri") != grant.redirect_uri
            or challenge.rstrip(b"=").decode() != grant.challenge
        ):
            return web.json_response({"error": "invalid_grant"}, status=400)
        nonce = self.nonce_override or grant.nonce
        id_token = self.sign({"aud": CLIENT_ID, "nonce": nonce} | grant.claims)
        return web.json_response(
            {
                "access_token": secrets.token_urlsafe(16),
                "token_type": "Bearer",
                "id_token": id_token,
            }
        )


def trusting(settings: Settings, provider: Provider) -> Settings:
    """`settings` with OIDC on: bearer tokens and the console's sign-in at `provider`."""
    return settings.model_copy(
        update={
            "oidc_issuer": provider.base,
            "oidc_audience": AUDIENCE,
            "oidc_jwks_url": f"{provider.base}/jwks",
            "oidc_client_id": CLIENT_ID,
            "oidc_client_secret": SecretStr(CLIENT_SECRET),
        }
    )


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[str]:
    """`lethe serve`'s application for `settings` on a free port; yields its base URL."""
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_config=None)
    )
    served = asyncio.create_task(server.serve())
    async with asyncio.timeout(30):
        while not server.started:  # noqa: ASYNC110 (uvicorn offers no event to wait on)
            await asyncio.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await served
