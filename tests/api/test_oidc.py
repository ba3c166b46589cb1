"""OIDC on the real stack: bearer tokens checked against a JWKS served by a test provider over
HTTP, and the console's authorization-code flow (state, nonce, PKCE) against the same provider.

The provider (tests/api/oidc_provider.py) makes real RSA keys; a second `lethe serve` app, set
up for it, runs beside the `api` fixture's over the same sample hospital.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from lethe.api.oidc import (
    MAX_DOCUMENT_BYTES,
    REFETCH_AT_MOST_EVERY_SECONDS,
    OidcVerifier,
    TokenRefused,
)
from lethe.api.oidc_login import FLOW_COOKIE
from lethe.api.sessions import SESSION_COOKIE
from tests.api.conftest import Api, api_settings
from tests.api.oidc_provider import AUDIENCE, Key, Provider, serving, trusting

pytestmark = pytest.mark.timeout(300)
PROBLEM = "application/problem+json"
NO_FLOW = "no sign-in under way"
STATE = "the state is not the sign-in's"


@dataclass
class OidcApi:
    """The API set up for the test provider."""

    base: str
    provider: Provider
    api: Api

    def client(self, token: str | None = None) -> httpx.AsyncClient:
        """A client of this API, with a bearer token if given (redirects are not followed)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=self.base, headers=headers, timeout=60)

    def token(self, role: str, tenant: str | None = None, **claims: Any) -> str:
        """A valid bearer token of the provider's for `role` (and `tenant`)."""
        named = {"lethe_role": role} | ({"lethe_tenant": tenant} if tenant else {})
        return self.provider.sign(named | claims)


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    """The test identity provider, serving on a free port."""
    found = Provider()
    await found.start()
    try:
        yield found
    finally:
        await found.stop()


@pytest.fixture
async def oidc_api(api: Api, provider: Provider) -> AsyncIterator[OidcApi]:
    """A second `lethe serve` app over the hospital, trusting the provider (bearer and sign-in)."""
    async with serving(trusting(api_settings(api.hospital), provider)) as base:
        yield OidcApi(base, provider, api)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _crafted(header: dict[str, Any], claims: dict[str, Any], sign: Any = None) -> str:
    """A JWT put together by hand (for algorithms PyJWT rightly refuses to make)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = sign(signing_input.encode()) if sign else b""
    return f"{signing_input}.{_b64(signature)}"


def _bad_tokens(oidc: OidcApi, tenant: str) -> dict[str, str]:
    """Tokens that must not stand for anyone, by what is wrong with them."""
    provider = oidc.provider
    dpo = {"lethe_role": "dpo", "lethe_tenant": tenant}
    valid_claims = jwt_claims(provider, dpo)
    key = provider.signing
    public_pem = key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {
        "expired": provider.sign(dpo, lifetime=-120),
        "wrong audience": provider.sign(dpo | {"aud": "someone-else"}),
        "wrong issuer": provider.sign(dpo | {"iss": "http://127.0.0.1:1/other"}),
        "another key, same kid": provider.sign(dpo, key=Key(key.kid, Key.rsa("x").private)),
        "another key, unknown kid": provider.sign(dpo, key=Key.rsa("stranger")),
        "alg none": _crafted({"alg": "none", "kid": key.kid, "typ": "JWT"}, valid_claims),
        "HS256 with the public key": _crafted(
            {"alg": "HS256", "kid": key.kid, "typ": "JWT"},
            valid_claims,
            lambda data: hmac.new(public_pem, data, hashlib.sha256).digest(),
        ),
        "no role": provider.sign({"lethe_tenant": tenant}),
        "unknown role": provider.sign({"lethe_role": "root", "lethe_tenant": tenant}),
        "dpo without tenant": provider.sign({"lethe_role": "dpo"}),
        "admin with tenant": provider.sign({"lethe_role": "admin", "lethe_tenant": tenant}),
        "no subject": provider.sign(dpo | {"sub": None}),
        "garbage": "eyJhbGciOi.not-a-token.at-all",
    }


REASONS = {
    "expired": "ExpiredSignatureError",
    "wrong audience": "InvalidAudienceError",
    "wrong issuer": "InvalidIssuerError",
    "another key, same kid": "InvalidSignatureError",
    "another key, unknown kid": "no key of the issuer has this key id",
    "alg none": "the token's algorithm is not accepted",
    "HS256 with the public key": "the token's algorithm is not accepted",
    "no role": "the token names no role",
    "unknown role": "the token names no role",
    "dpo without tenant": "a dpo token names no tenant",
    "admin with tenant": "an admin token names a tenant",
    "no subject": "MissingRequiredClaimError",
    "garbage": "not a JWT",
}


def jwt_claims(provider: Provider, extra: dict[str, Any]) -> dict[str, Any]:
    """The claims of a valid token (to put under a forged header)."""
    token = provider.sign(extra)
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * 4))
    return claims


async def test_bearer_tokens_of_the_issuer_act_for_their_tenant(oidc_api: OidcApi) -> None:
    api = oidc_api.api
    tenant_a, tenant_b = api.tenant("A"), api.tenant("B")
    async with oidc_api.client(oidc_api.token("dpo", tenant_a)) as http:
        me = await http.get("/v1/me")
        assert me.status_code == 200, me.text
        assert me.json() == {"name": "oidc:user-7", "role": "dpo", "tenant": tenant_a}
        listed = await http.get("/v1/erasures")
        assert listed.status_code == 200, listed.text
        assert all(r["tenant"] == tenant_a for r in listed.json())
        patient = api.hospital.patients[2]
        subject = {
            "tenant": tenant_a,
            "subject_id": patient.patient_id,
            "identities": {"email": patient.email},
        }
        submitted = await http.post("/v1/erasures", json={"subject": subject})
        assert submitted.status_code == 202, submitted.text
        request_id = submitted.json()["id"]
        seen = await _awaiting_approval(http, request_id)
        assert seen["requested_by"] == "oidc:user-7"
    # Tenant B's request (its plan fails: the hospital's map has no tenant B, but it exists).
    b_subject = {"tenant": tenant_b, "subject_id": "oidc-b-1", "identities": {"email": "b@x.org"}}
    async with api.client("dpo-b") as http:
        made = await http.post("/v1/erasures", json={"subject": b_subject})
        assert made.status_code == 202, made.text
        elsewhere = made.json()["id"]
    async with oidc_api.client(oidc_api.token("dpo", tenant_b)) as http:
        async with asyncio.timeout(60):  # B's DPO sees it (failed, 409) once it has started
            while (await http.get(f"/v1/erasures/{elsewhere}")).status_code != 409:  # noqa: ASYNC110
                await asyncio.sleep(0.3)
        hidden = await http.get(f"/v1/erasures/{request_id}")
        assert hidden.status_code == 404, hidden.text
        assert request_id not in [r["id"] for r in (await http.get("/v1/erasures")).json()]
    # Tenant A's DPO gets for B's request the answer for no request at all.
    async with oidc_api.client(oidc_api.token("dpo", tenant_a)) as http:
        assert (await http.get(f"/v1/erasures/{elsewhere}")).status_code == 404
        assert elsewhere not in [r["id"] for r in (await http.get("/v1/erasures")).json()]
    async with oidc_api.client(oidc_api.token("auditor")) as http:
        assert (await http.get(f"/v1/erasures/{request_id}")).status_code == 200
    async with oidc_api.client(oidc_api.token("dpo", tenant_a)) as http:
        rejected = await http.post(f"/v1/erasures/{request_id}/reject", json={"note": "test"})
        assert rejected.status_code == 202, rejected.text


async def _awaiting_approval(http: httpx.AsyncClient, request_id: str) -> dict[str, Any]:
    """Poll the request's status until it waits for a DPO's approval."""
    async with asyncio.timeout(90):
        while True:
            answer = await http.get(f"/v1/erasures/{request_id}")
            assert answer.status_code == 200, answer.text
            body: dict[str, Any] = answer.json()
            if body["status"]["state"] == "awaiting_approval":
                return body
            await asyncio.sleep(0.3)


async def test_each_bad_token_is_refused_for_its_own_reason(oidc_api: OidcApi) -> None:
    settings = api_settings(oidc_api.api.hospital).model_copy(
        update={
            "oidc_issuer": oidc_api.provider.base,
            "oidc_audience": AUDIENCE,
            "oidc_jwks_url": f"{oidc_api.provider.base}/jwks",
        }
    )
    verifier = OidcVerifier(settings)
    bad = _bad_tokens(oidc_api, oidc_api.api.tenant("A"))
    assert set(bad) == set(REASONS)
    for why, token in bad.items():
        with pytest.raises(TokenRefused) as refused:
            verifier.principal_of(await verifier.claims(token, audience=AUDIENCE))
        assert REASONS[why] in str(refused.value), (why, str(refused.value))
        assert await verifier.principal(token) is None
    good = oidc_api.token("auditor")
    assert verifier.principal_of(await verifier.claims(good, audience=AUDIENCE)).role == "auditor"


async def test_an_ec_key_signs_too_but_only_with_its_own_algorithm(oidc_api: OidcApi) -> None:
    provider = oidc_api.provider
    rsa_key, ec_key = provider.signing, Key.ec("ec-1")
    provider.keys.append(ec_key)
    verifier = OidcVerifier(trusting(api_settings(oidc_api.api.hospital), provider))
    auditor = {"lethe_role": "auditor"}
    found = await verifier.principal(provider.sign(auditor, key=ec_key))
    assert found is not None and found.role == "auditor"
    # An EC signature under the RSA key's id: the header's algorithm is not that key's.
    confused = provider.sign(auditor, key=ec_key, headers={"kid": rsa_key.kid})
    with pytest.raises(TokenRefused, match="not its key's"):
        await verifier.claims(confused, audience=AUDIENCE)
    # RS256 under the EC key's id (and the RSA key's private half): the key cannot be RSA's.
    swapped = provider.sign(auditor, key=Key(ec_key.kid, rsa_key.private))
    assert await verifier.principal(swapped) is None


async def test_a_large_key_set_is_read_whole_and_a_huge_one_refused(oidc_api: OidcApi) -> None:
    provider = oidc_api.provider
    settings = trusting(api_settings(oidc_api.api.hospital), provider)
    good = oidc_api.token("auditor")
    provider.jwks_padding = 200_000  # arrives in many chunks, under the limit
    assert await OidcVerifier(settings).principal(good) is not None
    provider.jwks_padding = MAX_DOCUMENT_BYTES + 1
    verifier = OidcVerifier(settings)
    with pytest.raises(TokenRefused, match="too large"):
        await verifier.claims(good, audience=AUDIENCE)


async def test_bad_bearer_tokens_are_refused_with_401(oidc_api: OidcApi) -> None:
    bad = _bad_tokens(oidc_api, oidc_api.api.tenant("A"))

    async def attempt(token: str) -> httpx.Response:
        async with oidc_api.client(token) as http:
            return await http.get("/v1/erasures")

    answers = dict(zip(bad, await asyncio.gather(*map(attempt, bad.values())), strict=True))
    for why, answer in answers.items():
        assert answer.status_code == 401, (why, answer.status_code, answer.text)
        assert answer.headers["content-type"] == PROBLEM, why
        assert answer.headers["www-authenticate"].startswith("Bearer"), why
        assert bad[why] not in answer.text
    lines = oidc_api.api.log.lines
    assert any("oidc" in line.lower() for line in lines)  # the refusals were logged...
    for token in bad.values():  # ...by category, never the token
        assert not [line for line in lines if token in line]
        assert not [line for line in lines if token.split(".")[1] in line]


async def test_a_new_signing_key_is_picked_up_and_unknown_ids_do_not_flood_the_issuer(
    oidc_api: OidcApi,
) -> None:
    provider, tenant = oidc_api.provider, oidc_api.api.tenant("A")
    async with oidc_api.client() as http:
        me = await http.get("/v1/me", headers=_bearer(oidc_api.token("dpo", tenant)))
        assert me.status_code == 200
        fetched = provider.jwks_fetches
        assert fetched == 1
        # Tokens naming keys nobody published: refused, with at most one refetch of the set.
        strangers = [
            provider.sign({"lethe_role": "auditor"}, key=Key.rsa(f"k{n}")) for n in range(5)
        ]
        answers = await asyncio.gather(
            *(http.get("/v1/me", headers=_bearer(token)) for token in strangers)
        )
        assert [a.status_code for a in answers] == [401] * 5
        assert provider.jwks_fetches <= fetched + 1
        # The provider rotates: the old key is withdrawn, a new one signs.
        old = provider.signing
        provider.rotate()
        await asyncio.sleep(REFETCH_AT_MOST_EVERY_SECONDS + 0.2)
        rotated = await http.get("/v1/me", headers=_bearer(oidc_api.token("dpo", tenant)))
        assert rotated.status_code == 200, rotated.text
        assert provider.jwks_fetches >= fetched + 1
        withdrawn = provider.sign({"lethe_role": "dpo", "lethe_tenant": tenant}, key=old)
        assert (await http.get("/v1/me", headers=_bearer(withdrawn))).status_code == 401


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _to_provider(oidc: OidcApi, browser: httpx.AsyncClient) -> str:
    """Start a sign-in; follow the redirect to the provider; return the callback URL it sends."""
    started = await browser.get("/console/oidc/login")
    assert started.status_code == 303, started.text
    target = started.headers["location"]
    assert target.startswith(f"{oidc.provider.base}/authorize?")
    query = parse_qs(urlsplit(target).query)
    assert query["code_challenge_method"] == ["S256"]
    assert query["redirect_uri"] == [f"{oidc.base}/console/oidc/callback"]
    assert len(query["state"][0]) >= 32 and len(query["nonce"][0]) >= 32
    assert FLOW_COOKIE in browser.cookies
    cookie = started.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "path=/console/oidc" in cookie
    async with httpx.AsyncClient() as elsewhere:
        back = await elsewhere.get(target)
    assert back.status_code == 303, back.text
    callback: str = back.headers["location"]
    assert callback.startswith(f"{oidc.base}/console/oidc/callback?")
    return callback


def _with_state(callback: str, state: str) -> str:
    query = parse_qs(urlsplit(callback).query)
    return f"{callback.split('?')[0]}?code={query['code'][0]}&state={state}"


def _refused(oidc: OidcApi, answer: httpx.Response, because: str) -> None:
    """The callback answered the failure page, started no session, and logged `because`."""
    assert answer.status_code == 400, answer.text
    assert "Sign-in failed" in answer.text
    assert SESSION_COOKIE not in answer.headers.get("set-cookie", "")
    refusals = [line for line in oidc.api.log.lines if "OIDC sign-in refused" in line]
    assert refusals and because in refusals[-1], (because, refusals[-1:])


async def test_the_console_signs_in_through_the_provider(oidc_api: OidcApi) -> None:
    provider, tenant = oidc_api.provider, oidc_api.api.tenant("A")
    provider.claims = {"lethe_role": "dpo", "lethe_tenant": tenant}
    async with oidc_api.client() as browser:
        callback = await _to_provider(oidc_api, browser)
        signed_in = await browser.get(callback)
        assert signed_in.status_code == 200, signed_in.text
        assert 'http-equiv="refresh" content="0;url=/console"' in signed_in.text
        assert "<script" not in signed_in.text
        assert browser.cookies.get(SESSION_COOKIE)
        assert FLOW_COOKIE not in browser.cookies  # the flow is over
        me = await browser.get("/v1/me")
        assert me.json() == {"name": "oidc:user-7", "role": "dpo", "tenant": tenant}
        # The same callback again (a replayed code): no sign-in under way any more.
        _refused(oidc_api, await browser.get(callback), NO_FLOW)
    # The log shows the callback's path, never its code or state.
    lines = oidc_api.api.log.lines
    assert any("GET /console/oidc/callback " in line for line in lines)
    for value in parse_qs(urlsplit(callback).query).values():
        assert not [line for line in lines if value[0] in line]


async def test_the_console_refuses_a_wrong_state_nonce_or_replayed_code(oidc_api: OidcApi) -> None:
    provider, tenant = oidc_api.provider, oidc_api.api.tenant("A")
    provider.claims = {"lethe_role": "dpo", "lethe_tenant": tenant}
    async with oidc_api.client() as browser:
        # A state that is not the sign-in's: refused before the code is exchanged.
        callback = await _to_provider(oidc_api, browser)
        asked = provider.token_requests
        _refused(oidc_api, await browser.get(_with_state(callback, "forged-state")), STATE)
        assert provider.token_requests == asked
        # Another browser's callback (a forced sign-in), in a browser with no sign-in under
        # way, or with its own: refused, and the code is not exchanged.
        async with oidc_api.client() as attacker, oidc_api.client() as fresh:
            forced = await _to_provider(oidc_api, attacker)
            _refused(oidc_api, await fresh.get(forced), NO_FLOW)
            await _to_provider(oidc_api, browser)
            _refused(oidc_api, await browser.get(forced), STATE)
        assert provider.token_requests == asked

        # An ID token whose nonce is not the sign-in's.
        provider.nonce_override = "someone-elses-nonce"
        _refused(oidc_api, await browser.get(await _to_provider(oidc_api, browser)), "nonce")
        provider.nonce_override = None

        # A code used once, replayed in a new sign-in (its own state): the provider refuses it.
        first = await _to_provider(oidc_api, browser)
        flow_cookie = browser.cookies[FLOW_COOKIE]
        assert (await browser.get(first)).status_code == 200
        second = await _to_provider(oidc_api, browser)
        state = parse_qs(urlsplit(second).query)["state"][0]
        _refused(oidc_api, await browser.get(_with_state(first, state)), "refused the code")
        # The first flow's cookie replayed with its callback: the flow was used.
        asked = provider.token_requests
        async with oidc_api.client() as replaying:
            headers = {"Cookie": f"{FLOW_COOKIE}={flow_cookie}"}
            _refused(oidc_api, await replaying.get(first, headers=headers), "already used")
        assert provider.token_requests == asked

        # The provider's refusal, an ID token for another client, or for an admin with a tenant.
        refusal = await _to_provider(oidc_api, browser)
        state = parse_qs(urlsplit(refusal).query)["state"][0]
        denied = f"{oidc_api.base}/console/oidc/callback?error=access_denied&state={state}"
        _refused(oidc_api, await browser.get(denied), "sent no code")
        provider.claims = {"lethe_role": "dpo", "lethe_tenant": tenant, "aud": "another-client"}
        _refused(oidc_api, await browser.get(await _to_provider(oidc_api, browser)), "Audience")
        provider.claims = {"lethe_role": "admin", "lethe_tenant": tenant}
        _refused(oidc_api, await browser.get(await _to_provider(oidc_api, browser)), "admin")
