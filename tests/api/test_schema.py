"""schemathesis against the API's OpenAPI document, on the real stack: generated requests (valid
and invalid) to every operation, as a DPO of tenant A, the all-tenant auditor and the admin;
no answer is a server error, every status is one the document declares, and every body
conforms to the declared schema of its status and media type.

The server runs in this test's event loop (tests/api/conftest.py), so the generated requests are
sent from a thread. Examples per operation are bounded so the whole run takes about a minute;
the number of cases run is printed. Half of the valid cases name tenant A where a body names a
tenant, so they reach past the tenant check: they submit erasures and place holds in this
module's own hospital (its workflows are ended with it). Generated ids are never a real
request's, so the event stream is checked as its 404 and 401 answers (the stream itself is
checked by test_erasure_api and the access matrix).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

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
EXAMPLES = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 20}
"""Examples per operation, principal and mode."""
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]

NOT_CHECKED = {("GET /v1/me", status_code_conformance)}
"""/v1/me (lethe/api/app.py) does not declare its 401 yet: `responses=problems.responses(401)`
on its route declares it, and then this exception goes."""


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


@dataclass(frozen=True)
class Caller:
    """Who sends the cases: the principal's session, and the tenant valid cases may name."""

    base: str
    principal: str
    secret: str
    tenant: str

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
    checks = [c for c in CHECKS if (operation.label, c) not in NOT_CHECKED]
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
        run.cases += 1
        response = case.call(base_url=caller.base, session=session, timeout=30)
        run.statuses[response.status_code] = run.statuses.get(response.status_code, 0) + 1
        case.validate_response(response, checks=checks)

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


def _fuzz(api: Api) -> Run:
    run = Run()
    for operation in _operations(api.base):
        for principal in FUZZED_AS:
            caller = Caller(api.base, principal, api.secrets[principal], api.tenant("A"))
            _exercise(run, operation, caller)
    return run


async def test_generated_requests_get_declared_answers_and_no_server_error(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    run = await asyncio.to_thread(_fuzz, api)
    took = time.monotonic() - started
    with capsys.disabled():  # in CI's output, not only when the test fails
        print(
            f"\nschemathesis: {run.cases} cases in {took:.0f} s, answers by status "
            f"{dict(sorted(run.statuses.items()))}, {len(run.failures)} failing"
        )
    assert run.cases > 0
    assert not run.failures, "\n".join(run.failures)
