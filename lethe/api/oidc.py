"""OpenID Connect tokens: a JWT signed by a key of the issuer's JWKS (PyJWT), as a principal.

A token must be signed with an asymmetric algorithm by a key the issuer publishes, carry the
configured issuer and audience, be within its lifetime, and name a role (and, for dpo and
service, a tenant; for admin, none) in the configured claims. The same checks serve bearer
tokens (audience LETHE_OIDC_AUDIENCE) and the console's ID tokens (audience the client id, and
the sign-in's nonce). The key set is fetched with aiohttp, kept for an hour, and refetched when
a token names a key it does not hold, at most once every few seconds, so tokens with made-up
key ids cannot make Lethe hammer the issuer. Why a token failed is logged as a category only:
no token, claim or subject ever reaches a log line or an answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import jwt

from lethe.api.principals import Principal
from lethe.evidence.tokens import ROLES, TENANT_ROLES, Role
from lethe.kernel.config import Settings

ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
KEY_TYPES = ("RSA", "EC")
LEEWAY_SECONDS = 30
KEYS_KEPT_SECONDS = 3600.0
REFETCH_AT_MOST_EVERY_SECONDS = 5.0
FETCH_TIMEOUT_SECONDS = 10.0
MAX_DOCUMENT_BYTES = 256 * 1024
REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub"]
log = logging.getLogger("lethe.api.oidc")


class TokenRefused(Exception):
    """A token that does not stand for a principal; the message is a category, never content."""


async def fetch_json(url: str, *, data: Mapping[str, str] | None = None, **kwargs: Any) -> Any:
    """GET (or, with `data`, POST a form to) `url` and parse its JSON answer; small ones only.

    Raises TokenRefused on any failure: a network error, a status other than 200, a document
    that is too large or not JSON."""
    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            method = "POST" if data is not None else "GET"
            async with http.request(method, url, data=data, allow_redirects=False, **kwargs) as r:
                if r.status != 200:
                    raise TokenRefused(f"the issuer answered {r.status}")
                return json.loads(await _read_at_most(r.content, MAX_DOCUMENT_BYTES))
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        raise TokenRefused(f"the issuer could not be reached ({type(error).__name__})") from None


async def _read_at_most(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """The whole body, refused past `limit` bytes."""
    body = bytearray()
    async for chunk in stream.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            raise TokenRefused("the issuer's answer is too large")
    return bytes(body)


class KeySet:
    """The issuer's signing keys by key id, fetched when needed."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.refetch_after = REFETCH_AT_MOST_EVERY_SECONDS
        self._keys: dict[str | None, dict[str, Any]] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def jwk(self, kid: str | None) -> dict[str, Any]:
        """The JWK for `kid` (None: the only key of a set of one); refetches once if unknown."""
        known = kid in self._keys or (kid is None and len(self._keys) == 1)
        if not known or time.monotonic() - self._fetched_at > KEYS_KEPT_SECONDS:
            await self._refresh()
        found = self._keys.get(kid)
        if found is None and kid is None and len(self._keys) == 1:
            found = next(iter(self._keys.values()))
        if found is None:
            raise TokenRefused("no key of the issuer has this key id")
        return found

    async def _refresh(self) -> None:
        """Fetch the set again, unless it was fetched (or tried) a moment ago."""
        async with self._lock:
            if time.monotonic() - self._fetched_at < self.refetch_after:
                return
            self._fetched_at = time.monotonic()  # a failure also waits before the next try
            document = await fetch_json(self.url)
            keys = document.get("keys") if isinstance(document, dict) else None
            if not isinstance(keys, list):
                raise TokenRefused("the issuer's key set is not a JWKS")
            self._keys = {
                key.get("kid"): key
                for key in keys
                if isinstance(key, dict)
                and key.get("kty") in KEY_TYPES
                and key.get("use", "sig") == "sig"
            }


def _signing_key(jwk: dict[str, Any], alg: str) -> jwt.PyJWK:
    """The key bound to the token's algorithm, if the JWK allows it (its `alg`, its type)."""
    if jwk.get("alg", alg) != alg:
        raise TokenRefused("the token's algorithm is not its key's")
    try:
        return jwt.PyJWK.from_dict(jwk, algorithm=alg)
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
        raise TokenRefused("the issuer's key does not fit the token's algorithm") from None


class OidcVerifier:
    """Turns an issuer's token into a principal, or None."""

    def __init__(self, settings: Settings) -> None:
        if not (settings.oidc_jwks_url and settings.oidc_issuer and settings.oidc_audience):
            raise ValueError("OIDC needs LETHE_OIDC_ISSUER, _AUDIENCE and _JWKS_URL")
        self.settings = settings
        self.keys = KeySet(settings.oidc_jwks_url)
        self.issuer = settings.oidc_issuer
        self._audience = settings.oidc_audience
        self._role_claim = settings.oidc_role_claim
        self._tenant_claim = settings.oidc_tenant_claim

    @staticmethod
    def looks_like_jwt(presented: str) -> bool:
        """Three dot-separated parts: worth trying as a JWT."""
        return presented.count(".") == 2

    async def principal(self, presented: str) -> Principal | None:
        """The principal of a valid bearer token, else None (the reason is only logged)."""
        try:
            claims = await self.claims(presented, audience=self._audience)
            return self.principal_of(claims)
        except TokenRefused as refused:
            log.info("OIDC bearer token refused: %s", refused)
            return None

    async def claims(
        self, presented: str, *, audience: str, required: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """The claims of a token whose signature, issuer, audience and lifetime hold."""
        try:
            header = jwt.get_unverified_header(presented)
        except jwt.PyJWTError:
            raise TokenRefused("not a JWT") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALGORITHMS:
            raise TokenRefused("the token's algorithm is not accepted")
        if kid is not None and not isinstance(kid, str):
            raise TokenRefused("the token's key id is not a string")
        key = _signing_key(await self.keys.jwk(kid), alg)
        try:
            claims: dict[str, Any] = jwt.decode(
                presented,
                key,
                algorithms=[alg],
                audience=audience,
                issuer=self.issuer,
                leeway=LEEWAY_SECONDS,
                options={
                    "require": [*REQUIRED_CLAIMS, *required],
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.PyJWTError as error:
            raise TokenRefused(f"the token does not hold ({type(error).__name__})") from None
        return claims

    def principal_of(self, claims: Mapping[str, Any]) -> Principal:
        """The principal the verified claims name: a known role, a tenant where it needs one."""
        role, tenant = claims.get(self._role_claim), claims.get(self._tenant_claim)
        if role not in ROLES:
            raise TokenRefused("the token names no role of Lethe's")
        if tenant is not None and (not isinstance(tenant, str) or not tenant):
            raise TokenRefused("the token's tenant is not a name")
        checked: Role = role
        if checked in TENANT_ROLES and tenant is None:
            raise TokenRefused(f"a {checked} token names no tenant")
        if checked == "admin" and tenant is not None:
            raise TokenRefused("an admin token names a tenant")
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise TokenRefused("the token's subject is not a name")
        return Principal(name=f"oidc:{subject[:180]}", role=checked, tenant=tenant, source="oidc")
