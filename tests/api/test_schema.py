"""schemathesis against the API's OpenAPI document, on the real stack: generated requests (valid
and invalid) to every operation, as a DPO of tenant A, the all-tenant auditor and the admin;
no answer is a server error, every status is one the document declares, and every body
conforms to the declared schema of its status and media type.

The server runs in this test's event loop (tests/api/conftest.py), so the generated requests are
sent from a thread. Examples per operation are bounded so the whole run takes about a minute;
the number of cases run is printed. Half of the valid cases name tenant A where a body names a
tenant and address A's real objects by their path parameters (a rejected request, a bulk
request, a hold, a token), so they reach past the tenant check and the 404: the status, plan,
certificate, event stream (a settled request's ends after one event), bulk progress and the
rest are checked against their schemas. They submit erasures, place and release holds and
revoke the token in this module's own hospital (its workflows are ended with it).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.api.conftest import Api

pytestmark = pytest.mark.timeout(300)
FUZZED_AS = ("dpo-a", "auditor-all", "admin")
EXAMPLES = {GenerationMode.POSITIVE: 30, GenerationMode.NEGATIVE: 15}
"""Examples per operation, principal and mode."""
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]

Operation = APIOperation[Any, Any, Any, Any]


@dataclass
class Run:
    """What the run did: cases sent, and the failures (operation, principal, what)."""

    cases: int = 0
    failures: list[str] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)


def _operations(base: str) -> Iterator[Operation]:
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), (
            f"the document has an operation schemathesis cannot read: {result.err()}"
        )
        yield result.ok()


def _for_tenant(case: Case[Operation], tenant: str) -> None:
    """Name `tenant` wherever the body names one, so a case gets past the tenant check."""
    body = case.body
    if not isinstance(body, dict):
        return
    for holder in (body, body.get("subject")):
        if isinstance(holder, dict) and "tenant" in holder:
            holder["tenant"] = tenant


def _to_objects(case: Case[Operation], ids: dict[str, str]) -> None:
    """Address real objects (a request, a bulk request, a hold, a token) by their path
    parameters, so a case reaches past the 404."""
    for name in case.path_parameters or {}:
        if name in ids:
            case.path_parameters[name] = ids[name]


@dataclass(frozen=True)
class Caller:
    """Who sends the cases: the principal's session, the tenant valid cases may name and the
    objects they may address."""

    base: str
    principal: str
    secret: str
    tenant: str
    ids: dict[str, str]

    def session(self) -> requests.Session:
        """A session that signs every request in."""
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {self.secret}"
        return session


def _cases(
    run: Run, operation: Operation, caller: Caller, mode: GenerationMode
) -> Callable[[], None]:
    """A Hypothesis test sending EXAMPLES[mode] cases of the operation as the caller; half of
    the valid ones name the caller's tenant, so they get past the tenant check."""
    session = caller.session()
    steer = caller.tenant if mode == GenerationMode.POSITIVE else None

    @settings(
        max_examples=EXAMPLES[mode],
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode), own=st.booleans())
    def exercised(case: Case[Operation], own: bool) -> None:
        if own and steer:
            _for_tenant(case, steer)
            _to_objects(case, caller.ids)
        run.cases += 1
        response = case.call(base_url=caller.base, session=session, timeout=30)
        run.statuses[response.status_code] = run.statuses.get(response.status_code, 0) + 1
        case.validate_response(response, checks=CHECKS)

    return exercised


def _exercise(run: Run, operation: Operation, caller: Caller) -> None:
    """The operation's valid and invalid cases as one principal; each mode's first failure is
    kept."""
    for mode in EXAMPLES:
        try:
            _cases(run, operation, caller, mode)()
        except Unsatisfiable:
            continue  # nothing to make invalid (no parameters, no body): no negative cases
        except (Exception, BaseExceptionGroup) as exc:  # a failure: its first lines, no token
            what = " | ".join(str(exc).strip().splitlines()[:12]).replace(caller.secret, "<token>")
            run.failures.append(f"{operation.label} as {caller.principal} ({mode.value}): {what}")


def _fuzz(api: Api, ids: dict[str, str]) -> Run:
    run = Run()
    for operation in _operations(api.base):
        for principal in FUZZED_AS:
            caller = Caller(api.base, principal, api.secrets[principal], api.tenant("A"), ids)
            _exercise(run, operation, caller)
    return run


async def _until(http: httpx.AsyncClient, request_id: str, state: str) -> None:
    async with asyncio.timeout(90):
        path = f"/v1/erasures/{request_id}"
        while (await http.get(path)).json()["status"]["state"] != state:  # noqa: ASYNC110
            await asyncio.sleep(0.3)


async def _objects(api: Api) -> dict[str, str]:
    """Tenant A's objects for valid cases to address: a request (rejected, so a decision is a
    409), a bulk request, a hold and an auditor token, by their path parameter's name."""
    tenant, run = api.tenant("A"), uuid.uuid4().hex[:8]
    subject = {"subject_id": f"schema-{run}", "identities": {"email": f"s-{run}@example.org"}}
    async with api.client("dpo-a") as dpo, api.client("admin") as admin:
        made = await dpo.post("/v1/erasures", json={"subject": {"tenant": tenant, **subject}})
        request_id = made.json()["id"]
        bulk = await dpo.post("/v1/erasures/bulk", json={"tenant": tenant, "subjects": [subject]})
        hold = await dpo.post(
            "/v1/holds",
            json={"matter": "schema", "scope": "system", "value": "nowhere", "reason": "schema"},
        )
        token = await admin.post("/v1/tokens", json={"name": "schema", "role": "auditor"})
        await _until(dpo, request_id, "awaiting_approval")
        rejected = await dpo.post(f"/v1/erasures/{request_id}/reject", json={"note": "schema"})
        assert rejected.status_code == 202, rejected.text
        await _until(dpo, request_id, "rejected")
    return {
        "request_id": request_id,
        "bulk_id": bulk.json()["id"],
        "hold_id": hold.json()["id"],
        "token_id": token.json()["token"]["id"],
    }


async def test_generated_requests_get_declared_answers_and_no_server_error(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = await _objects(api)
    started = time.monotonic()
    run = await asyncio.to_thread(_fuzz, api, ids)
    took = time.monotonic() - started
    with capsys.disabled():  # in CI's output, not only when the test fails
        print(
            f"\nschemathesis: {run.cases} cases in {took:.0f} s, answers by status "
            f"{dict(sorted(run.statuses.items()))}, {len(run.failures)} failing"
        )
    assert run.cases > 0
    assert not run.failures, "\n".join(run.failures)
