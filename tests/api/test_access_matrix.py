"""The authorization matrix: every endpoint of the OpenAPI document x every principal x the
tenant of the object it addresses, against an expected outcome written out here by hand.

The table below is the rule of issue 13 stated independently of `lethe.api.principals.GRANTS`:
- dpo: submits, decides (approve, reject, extend, recheck), holds, ledger, lookup, forget-list,
  retention, and reads requests and certificates; its own tenant only;
- auditor: reads requests, certificates, ledger, holds, lookup, forget-list, keys, retention;
  one tenant, or all;
- service: submits, and reads the requests it submitted (nothing else, not a colleague's);
- admin: tokens and keys; no erasure data;
- anonymous: 401 everywhere but /v1/health (and /openapi.json, /docs outside the document).

A role without the grant gets 403 whatever the object; a principal with the grant gets 404 for
an object it may not see (another tenant's, or another service's), the same answer as for one
that does not exist; a body naming another tenant (a submission, a hold, a lookup) is 403, since
nothing exists yet to hide. Allowed calls that change things are made harmless: decisions go to
settled requests (409: the request takes no decision now), submissions for tenant A join a
request already running, bulk submissions lack an identity the plan needs (422 BulkRefused),
releases go to holds already released (releasing twice is harmless), and each DELETE of a token
gets a fresh token.

Tenant B ("other-clinic") is not in the hospital's data map: its request exists (it failed at
planning, so its status is 409 RequestFailed and it has no certificate), its bulk request cannot
be made (so the bulk row is tried on A's only), its hold can.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
import pytest

from lethe.evidence import tokens
from lethe.evidence.store import engine_for
from tests.api.conftest import PRINCIPALS, Api

pytestmark = pytest.mark.timeout(300)
PROBLEM = "application/problem+json"
ANONYMOUS = "anonymous"

DPO, AUDITOR, SERVICE, ADMIN = "dpo", "auditor", "service", "admin"
EVERY_ROLE = frozenset({DPO, AUDITOR, SERVICE, ADMIN})

# Who sees each object (by principal name), written by hand: a tenant's DPO and auditors, the
# all-tenant auditor, and of the services only the one that submitted it. `tenant-*` is a tenant
# named in a request body: who may act for it.
SEEN_BY: dict[str, frozenset[str]] = {
    "request-A": frozenset({"dpo-a", "auditor-a", "auditor-all", "service-a"}),
    "request-B": frozenset({"dpo-b", "auditor-all"}),
    "bulk-A": frozenset({"dpo-a", "auditor-a", "auditor-all", "service-a"}),
    "hold-A": frozenset({"dpo-a", "auditor-a", "auditor-all"}),
    "hold-B": frozenset({"dpo-b", "auditor-all"}),
    "tenant-A": frozenset(
        {"dpo-a", "auditor-a", "auditor-all", "service-a", "service-a2", "admin"}
    ),
    "tenant-B": frozenset({"dpo-b", "auditor-all", "admin"}),
}
REQUESTS = ("request-A", "request-B")
HOLDS = ("hold-A", "hold-B")
TENANTS = ("tenant-A", "tenant-B")
NONE = ("-",)


@dataclass(frozen=True)
class Outcome:
    """What a call answers: its status, the problem's title (errors), and for a listing whether
    the object is in it."""

    status: int
    title: str | None = None
    listed: bool | None = None
    says: str | None = None
    """Text the answer's body holds."""


OK = Outcome(200)
CREATED = Outcome(201)
ACCEPTED = Outcome(202)
SETTLED = Outcome(409, "Conflict")
UNAUTHORIZED = Outcome(401, "Unauthorized")
FORBIDDEN = Outcome(403, "Forbidden")
HIDDEN = Outcome(404, "Not Found")


@dataclass
class World:
    """The objects the matrix addresses, made before it runs."""

    api: Api
    ids: dict[str, str] = field(default_factory=dict)
    subjects: dict[str, dict[str, Any]] = field(default_factory=dict)

    def tenant(self, key: str) -> str:
        """The tenant of an object key (`request-A`, `tenant-B`, ...)."""
        return self.api.tenant(key[-1])

    def subject(self, key: str) -> dict[str, Any]:
        """A subject of the key's tenant (for A: the running request's, so a submission joins)."""
        return self.subjects[key[-1]]


Call = Callable[[World, httpx.AsyncClient, str], Awaitable[httpx.Response]]


@dataclass(frozen=True)
class Row:
    """One endpoint: the roles that may call it, the objects it is tried on, and what an allowed
    call answers for each object."""

    roles: frozenset[str]
    call: Call
    on: tuple[str, ...] = NONE
    allowed: dict[str, Outcome] | Outcome = OK
    public: bool = False
    listing: Callable[[World, Any, str], bool] | None = None
    """For a listing: whether the object is in the answer."""

    def expected(self, principal: str, role: str | None, key: str) -> Outcome:
        """The outcome this row states for a principal on an object."""
        if self.public:
            return self._allowed(key)
        if role is None:
            return UNAUTHORIZED
        if role not in self.roles:
            return FORBIDDEN
        if key == "-":
            return self._allowed(key)
        seen = principal in SEEN_BY[key]
        if self.listing is not None:
            return Outcome(200, listed=seen)
        if not seen:
            return FORBIDDEN if key.startswith("tenant-") else HIDDEN
        return self._allowed(key)

    def _allowed(self, key: str) -> Outcome:
        return self.allowed if isinstance(self.allowed, Outcome) else self.allowed[key]


def get(path: str, **params: Any) -> Call:
    """A GET of `path`, formatted with the object's id as `{id}`."""

    async def call(world: World, http: httpx.AsyncClient, key: str) -> httpx.Response:
        return await http.get(path.format(id=world.ids.get(key, "")), params=params)

    return call


def post(path: str, body: Callable[[World, str], Any] | None = None) -> Call:
    """A POST of `path` (formatted with the object's id) with the body made for the object."""

    async def call(world: World, http: httpx.AsyncClient, key: str) -> httpx.Response:
        url = path.format(id=world.ids.get(key, ""))
        if body is None:
            return await http.post(url)
        return await http.post(url, json=body(world, key))

    return call


async def _events(world: World, http: httpx.AsyncClient, key: str) -> httpx.Response:
    """The request's event stream; a settled request's ends after its one event."""
    async with asyncio.timeout(30):
        return await http.get(f"/v1/erasures/{world.ids[key]}/events")


async def _revoke_fresh(world: World, http: httpx.AsyncClient, key: str) -> httpx.Response:
    """DELETE a token made for this call only."""
    store = await engine_for(world.api.hospital.store_url)
    made, _ = await tokens.create(
        store,
        name=f"matrix-{uuid.uuid4().hex[:6]}",
        role="auditor",
        tenant=None,
        lifetime=timedelta(minutes=10),
        created_by="test",
    )
    return await http.delete(f"/v1/tokens/{made.id}")


def _submission(world: World, key: str) -> dict[str, Any]:
    return {"subject": world.subject(key), "reason": "access matrix"}


def _bulk(world: World, key: str) -> dict[str, Any]:
    # No e-mail: the hospital's plan needs one for every subject, so it is refused (422).
    return {"tenant": world.tenant(key), "subjects": [{"subject_id": "matrix-bulk"}]}


def _hold(world: World, key: str) -> dict[str, Any]:
    subject = {"tenant": world.tenant(key), "subject_id": f"matrix-nobody-{uuid.uuid4().hex[:6]}"}
    return {"matter": "matrix", "scope": "subject", "subject": subject, "reason": "matrix"}


def _lookup(world: World, key: str) -> dict[str, Any]:
    return {"tenant": world.tenant(key), "subject_id": "matrix-nobody"}


def _in_ids(world: World, answer: Any, key: str) -> bool:
    return world.ids[key] in {item["id"] for item in answer}


def _in_ledger(world: World, answer: Any, key: str) -> bool:
    return any(entry["tenant"] == world.tenant(key) for entry in answer["entries"])


def _tenant_filter(path: str) -> Call:
    async def call(world: World, http: httpx.AsyncClient, key: str) -> httpx.Response:
        return await http.get(path, params={"tenant": world.tenant(key), "limit": 500})

    return call


READERS = frozenset({DPO, AUDITOR, SERVICE})
OVERSIGHT = frozenset({DPO, AUDITOR})
DPO_ONLY = frozenset({DPO})
SUBMITTERS = frozenset({DPO, SERVICE})
REQUEST_READ = {"request-A": OK, "request-B": Outcome(409, "RequestFailed")}
CERTIFICATE = {"request-A": OK, "request-B": Outcome(404, "UnknownRequest")}

MATRIX: dict[tuple[str, str], Row] = {
    ("GET", "/v1/health"): Row(EVERY_ROLE, get("/v1/health"), public=True),
    ("GET", "/v1/me"): Row(EVERY_ROLE, get("/v1/me")),
    ("POST", "/v1/erasures"): Row(SUBMITTERS, post("/v1/erasures", _submission), TENANTS, ACCEPTED),
    ("POST", "/v1/erasures/plan"): Row(
        SUBMITTERS,
        post("/v1/erasures/plan", _submission),
        TENANTS,
        {"tenant-A": OK, "tenant-B": Outcome(409, "RequestFailed")},
    ),
    ("POST", "/v1/erasures/bulk"): Row(
        SUBMITTERS, post("/v1/erasures/bulk", _bulk), TENANTS, Outcome(422, "BulkRefused")
    ),
    ("GET", "/v1/erasures/bulk/{bulk_id}"): Row(
        READERS, get("/v1/erasures/bulk/{id}"), ("bulk-A",)
    ),
    ("GET", "/v1/erasures"): Row(
        READERS, _tenant_filter("/v1/erasures"), REQUESTS, listing=_in_ids
    ),
    ("GET", "/v1/erasures/{request_id}"): Row(
        READERS, get("/v1/erasures/{id}"), REQUESTS, REQUEST_READ
    ),
    ("GET", "/v1/erasures/{request_id}/plan"): Row(
        READERS, get("/v1/erasures/{id}/plan"), REQUESTS
    ),
    ("GET", "/v1/erasures/{request_id}/events"): Row(
        READERS,
        _events,
        REQUESTS,
        {
            "request-A": Outcome(200, says="event: status"),
            "request-B": Outcome(200, says="event: problem"),
        },
    ),
    ("POST", "/v1/erasures/{request_id}/approve"): Row(
        DPO_ONLY, post("/v1/erasures/{id}/approve", lambda w, k: {"note": "m"}), REQUESTS, SETTLED
    ),
    ("POST", "/v1/erasures/{request_id}/reject"): Row(
        DPO_ONLY, post("/v1/erasures/{id}/reject", lambda w, k: {"note": "m"}), REQUESTS, SETTLED
    ),
    ("POST", "/v1/erasures/{request_id}/extend"): Row(
        DPO_ONLY,
        post("/v1/erasures/{id}/extend", lambda w, k: {"months": 1, "reason": "matrix"}),
        REQUESTS,
        SETTLED,
    ),
    ("POST", "/v1/erasures/{request_id}/recheck"): Row(
        DPO_ONLY, post("/v1/erasures/{id}/recheck"), REQUESTS, SETTLED
    ),
    ("GET", "/v1/erasures/{request_id}/certificate"): Row(
        READERS, get("/v1/erasures/{id}/certificate"), REQUESTS, CERTIFICATE
    ),
    ("GET", "/v1/erasures/{request_id}/certificate.html"): Row(
        READERS,
        get("/v1/erasures/{id}/certificate.html"),
        REQUESTS,
        CERTIFICATE | {"request-A": Outcome(200, says="Certificate of erasure")},
    ),
    ("GET", "/v1/holds"): Row(
        OVERSIGHT, get("/v1/holds", include_released=True), HOLDS, listing=_in_ids
    ),
    ("POST", "/v1/holds"): Row(DPO_ONLY, post("/v1/holds", _hold), TENANTS, CREATED),
    ("POST", "/v1/holds/{hold_id}/release"): Row(DPO_ONLY, post("/v1/holds/{id}/release"), HOLDS),
    ("GET", "/v1/ledger"): Row(
        OVERSIGHT, _tenant_filter("/v1/ledger"), TENANTS, listing=_in_ledger
    ),
    ("GET", "/v1/ledger/verify"): Row(OVERSIGHT, get("/v1/ledger/verify")),
    ("POST", "/v1/subjects/lookup"): Row(OVERSIGHT, post("/v1/subjects/lookup", _lookup), TENANTS),
    ("GET", "/v1/forget-list"): Row(OVERSIGHT, get("/v1/forget-list")),
    ("GET", "/v1/keys"): Row(frozenset({AUDITOR, ADMIN}), get("/v1/keys")),
    ("GET", "/v1/retention/runs"): Row(OVERSIGHT, get("/v1/retention/runs")),
    # No sweep has run in this deployment: an allowed caller is told there is no such run.
    ("GET", "/v1/retention/runs/{run_id}"): Row(
        OVERSIGHT, get("/v1/retention/runs/sweep-none"), allowed=Outcome(404, "UnknownSweep")
    ),
    ("POST", "/v1/tokens"): Row(
        frozenset({ADMIN}),
        post("/v1/tokens", lambda w, k: {"name": "matrix", "role": "auditor", "days": 1}),
        allowed=CREATED,
    ),
    ("GET", "/v1/tokens"): Row(frozenset({ADMIN}), get("/v1/tokens")),
    ("DELETE", "/v1/tokens/{token_id}"): Row(frozenset({ADMIN}), _revoke_fresh),
}


async def _until(
    http: httpx.AsyncClient, path: str, done: Callable[[httpx.Response], bool]
) -> None:
    async with asyncio.timeout(90):
        while not done(await http.get(path)):  # noqa: ASYNC110 (polling the API itself)
            await asyncio.sleep(0.3)


def _state_is(state: str) -> Callable[[httpx.Response], bool]:
    return lambda r: r.status_code == 200 and r.json()["status"]["state"] == state


async def _request(http: httpx.AsyncClient, subject: dict[str, Any]) -> str:
    answer = await http.post("/v1/erasures", json={"subject": subject, "reason": "matrix"})
    assert answer.status_code == 202, answer.text
    request_id: str = answer.json()["id"]
    return request_id


async def _made(api: Api) -> World:
    """A's settled request (service-a's), A's running one, B's (failed), A's bulk, and a
    released hold of each tenant."""
    world = World(api)
    run = uuid.uuid4().hex[:8]

    def subject(tenant: str, name: str) -> dict[str, Any]:
        email = f"{name}-{run}@example.org"
        return {"tenant": tenant, "subject_id": f"{name}-{run}", "identities": {"email": email}}

    world.subjects = {"A": subject(api.tenant("A"), "open"), "B": subject(api.tenant("B"), "b")}
    async with api.client("service-a") as service, api.client("dpo-a") as dpo:
        settled = await _request(service, subject(api.tenant("A"), "settled"))
        world.ids["open"] = await _request(service, world.subjects["A"])
        bulk = await service.post(
            "/v1/erasures/bulk",
            json={
                "tenant": api.tenant("A"),
                "subjects": [
                    {"subject_id": f"bulk-{run}", "identities": {"email": "b@example.org"}}
                ],
            },
        )
        assert bulk.status_code == 202, bulk.text
        world.ids["bulk-A"] = bulk.json()["id"]
        for request_id in (settled, world.ids["open"]):
            await _until(dpo, f"/v1/erasures/{request_id}", _state_is("awaiting_approval"))
        rejected = await dpo.post(f"/v1/erasures/{settled}/reject", json={"note": "matrix"})
        assert rejected.status_code == 202, rejected.text
        await _until(dpo, f"/v1/erasures/{settled}", _state_is("rejected"))
        world.ids["request-A"] = settled
    async with api.client("dpo-b") as other:
        # Not the subject submissions name: a submission would start a new run of this one.
        world.ids["request-B"] = await _request(other, subject(api.tenant("B"), "b-failed"))
        await _until(
            other, f"/v1/erasures/{world.ids['request-B']}", lambda r: r.status_code == 409
        )
    for which, principal in (("A", "dpo-a"), ("B", "dpo-b")):
        async with api.client(principal) as http:
            placed = await http.post("/v1/holds", json=_hold(world, f"hold-{which}"))
            assert placed.status_code == 201, placed.text
            world.ids[f"hold-{which}"] = placed.json()["id"]
            released = await http.post(f"/v1/holds/{placed.json()['id']}/release")
            assert released.status_code == 200, released.text
    # Listings come from Temporal's visibility, a moment behind.
    async with api.client("auditor-all") as auditor:
        for key in REQUESTS:

            def listed(answer: httpx.Response, key: str = key) -> bool:
                return _in_ids(world, answer.json(), key)

            await _until(auditor, f"/v1/erasures?tenant={world.tenant(key)}&limit=500", listed)
    return world


@pytest.fixture(scope="module")
async def world(api: Api) -> AsyncIterator[World]:
    """The objects; afterwards A's running request is rejected (the holds the matrix places are
    on subjects nobody has, in the hospital's own store, dropped with it)."""
    made = await _made(api)
    yield made
    async with api.client("dpo-a") as dpo:
        await dpo.post(f"/v1/erasures/{made.ids['open']}/reject", json={"note": "matrix done"})


def _check(row: Row, expected: Outcome, answer: httpx.Response, world: World, key: str) -> str:
    """'' if the answer is the expected one, else what differs."""
    if answer.status_code != expected.status:
        return f"status {answer.status_code} (expected {expected.status}): {answer.text[:200]}"
    if expected.says is not None and expected.says not in answer.text:
        return f"the answer does not say {expected.says!r}: {answer.text[:200]}"
    if expected.status >= 400:
        if answer.headers.get("content-type") != PROBLEM:
            return f"content-type {answer.headers.get('content-type')}"
        if expected.title is not None and answer.json()["title"] != expected.title:
            return f"title {answer.json()['title']!r} (expected {expected.title!r})"
        if expected.status == 401 and not answer.headers.get("www-authenticate"):
            return "no WWW-Authenticate"
    if expected.listed is None or row.listing is None:
        return ""
    if row.listing(world, answer.json(), key) != expected.listed:
        return f"listed is {not expected.listed} (expected {expected.listed})"
    return ""


async def _cell(world: World, row: Row, principal: str, key: str) -> str:
    """'' if the principal's call on the object answers as the table says, else what differs."""
    role = None if principal == ANONYMOUS else PRINCIPALS[principal][0]
    expected = row.expected(principal, role, key)
    name = None if principal == ANONYMOUS else principal
    async with world.api.client(name) as http:
        try:
            answer = await row.call(world, http, key)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__} (a broken answer)"
    return _check(row, expected, answer, world, key)


async def test_the_matrix_covers_every_operation_of_the_openapi_document(api: Api) -> None:
    async with api.client() as anonymous:
        document = (await anonymous.get("/openapi.json")).json()
    operations = {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in ("get", "put", "post", "delete", "patch")
    }
    assert operations - set(MATRIX) == set(), "endpoints without a row in the matrix"
    assert set(MATRIX) - operations == set(), "rows for endpoints the document does not have"


async def test_every_endpoint_x_principal_x_tenant_answers_as_the_table_says(
    api: Api, world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    principals = [*PRINCIPALS, ANONYMOUS]
    wrong: list[str] = []
    cells = 0
    for (method, path), row in MATRIX.items():
        for principal in principals:
            for key in row.on:
                problem = await _cell(world, row, principal, key)
                cells += 1
                if problem:
                    wrong.append(f"{method} {path} as {principal} on {key}: {problem}")
    with capsys.disabled():  # in CI's output, not only when the test fails
        print(f"\naccess matrix: {cells} cells checked, {len(wrong)} wrong")
    assert not wrong, "\n".join(wrong)


async def test_unfiltered_listings_keep_to_the_principals_tenants(api: Api, world: World) -> None:
    tenants = {name: {api.tenant(w)} if w else None for name, (_, w) in PRINCIPALS.items()}
    checked = 0
    for principal, role in ((n, r) for n, (r, _) in PRINCIPALS.items()):
        mine = tenants[principal]
        async with api.client(principal) as http:
            for path, inside in (
                ("/v1/erasures", None),
                ("/v1/holds?include_released=true", None),
                ("/v1/ledger", "entries"),
            ):
                answer = await http.get(path)
                if answer.status_code == 403:
                    continue
                assert answer.status_code == 200, (principal, path, answer.text)
                items = answer.json()[inside] if inside else answer.json()
                seen = {item["tenant"] for item in items}
                checked += 1
                if mine is not None:
                    assert seen <= mine, (principal, path, seen)
        if role == SERVICE:
            async with api.client(principal) as http:
                listed = {r["id"] for r in (await http.get("/v1/erasures")).json()}
            assert (world.ids["request-A"] in listed) == (principal == "service-a")
    print(f"unfiltered listings: {checked} checked")


async def test_the_documents_and_health_need_no_sign_in(api: Api) -> None:
    async with api.client() as anonymous:
        for path in ("/openapi.json", "/docs", "/v1/health"):
            assert (await anonymous.get(path)).status_code == 200, path
