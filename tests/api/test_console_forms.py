"""The console's forms over plain HTTP (no browser), on the real stack: the session cookie's
attributes, CSRF refusals that change nothing, the slowed sign-in, the same grants and tenant
isolation as the API, and pages with a CSP, no inline script or style and no outside address."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import Response

from lethe.api import console, pages
from lethe.api.principals import Principal
from lethe.api.sessions import SESSION_COOKIE, Sessions
from lethe.contracts import Decision, ErasureStatus
from lethe.sdk.requests import RequestListed
from tests.api.conftest import Api
from tests.api.test_erasure_api import _state

pytestmark = pytest.mark.timeout(300)
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
INLINE_SCRIPT = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>", re.IGNORECASE)
STYLE_ATTRIBUTE = re.compile(r"<[^>]+\sstyle\s*=", re.IGNORECASE)
OUTSIDE = re.compile(r"""(?:src|href|action)\s*=\s*["']?(?:https?:)?//""", re.IGNORECASE)


def _csrf(page: str) -> str:
    found = CSRF.search(page)
    assert found, "the page has no CSRF field"
    return found.group(1)


@asynccontextmanager
async def _signed_in(api: Api, name: str) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A client signed in to the console as `name`, and its session's CSRF token."""
    async with api.client(follow_redirects=False) as http:
        yield http, await _sign_in(http, api, name)


async def _sign_in(http: httpx.AsyncClient, api: Api, name: str) -> str:
    form = await http.get("/console/sign-in")
    signed = await http.post(
        "/console/sign-in", data={"token": api.secrets[name], "csrf": _csrf(form.text)}
    )
    assert signed.status_code == 303, signed.text
    assert signed.headers["location"] == "/console"
    home = await http.get("/console/requests/new" if name.startswith("dpo") else "/console")
    assert home.status_code == 200, home.text
    return _csrf(home.text)


async def _hold_ids(api: Api) -> set[str]:
    async with api.client("dpo-a") as http:
        answer = await http.get("/v1/holds")
        assert answer.status_code == 200
        return {hold["id"] for hold in answer.json()}


async def _exists(api: Api, request_id: str) -> bool:
    async with api.client("dpo-a") as http:
        answer = await http.get(f"/v1/erasures/{request_id}")
        assert answer.status_code in (200, 404), answer.text
        return answer.status_code == 200


async def test_sign_in_sets_an_http_only_strict_cookie(api: Api) -> None:
    async with api.client(follow_redirects=False) as http:
        form = await http.get("/console/sign-in")
        assert form.status_code == 200
        assert 'name="token"' in form.text and '<label for="token">' in form.text
        signed = await http.post(
            "/console/sign-in", data={"token": api.secrets["dpo-a"], "csrf": _csrf(form.text)}
        )
        assert signed.status_code == 303
        cookie = next(
            value
            for key, value in signed.headers.multi_items()
            if key == "set-cookie" and value.startswith(f"{SESSION_COOKIE}=")
        )
        attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
        assert "httponly" in attributes
        assert "samesite=strict" in attributes
        assert "secure" not in attributes  # the tests serve plain http (api_insecure_cookies)
        queue = await http.get("/console")
        assert queue.status_code == 200
        assert "dpo-a" in queue.text and api.tenant("A") in queue.text
        # Signing out ends the session.
        out = await http.post("/console/sign-out", data={"csrf": _csrf(queue.text)})
        assert out.status_code == 303
        assert out.headers["location"] == "/console/sign-in"
        again = await http.get("/console")
        assert again.status_code == 303
        assert again.headers["location"] == "/console/sign-in"

    response = Response()
    Sessions(b"k" * 32, secure=True).issue(response, Principal("x", "dpo", "t", "token"))
    attributes = {part.strip().lower() for part in response.headers["set-cookie"].split(";")}
    assert {"secure", "httponly", "samesite=strict"} <= attributes


async def test_a_sign_in_without_its_form_token_is_refused(api: Api) -> None:
    async with api.client(follow_redirects=False) as http:
        await http.get("/console/sign-in")
        refused = await http.post(
            "/console/sign-in", data={"token": api.secrets["dpo-a"], "csrf": "forged"}
        )
        assert refused.status_code == 403
        assert SESSION_COOKIE not in refused.headers.get("set-cookie", "")


async def test_posts_without_or_with_a_wrong_csrf_token_are_refused_and_change_nothing(
    api: Api,
) -> None:
    patient = api.hospital.patients[2]
    request_id = api.hospital.workflow_id(patient)
    async with _signed_in(api, "dpo-a") as (http, csrf):
        holds_before = await _hold_ids(api)
        hold = {"matter": "Case 9", "scope": "system", "value": "crm", "reason": "litigation"}
        subject = {"subject_id": patient.patient_id, "email": patient.email, "reason": "Art. 17"}
        for forged in ({}, {"csrf": "wrong-" + csrf[6:]}, {"csrf": ""}):
            refused = await http.post("/console/holds", data=hold | forged)
            assert refused.status_code == 403, refused.text
            assert "CSRF" in refused.text
            refused = await http.post("/console/requests/new", data=subject | forged)
            assert refused.status_code == 403
        assert await _hold_ids(api) == holds_before
        assert not await _exists(api, request_id)

        # With the token, the same forms work: the hold is placed and released, the request
        # is submitted (its address holds no subject id) and rejected.
        placed = await http.post("/console/holds", data=hold | {"csrf": csrf})
        assert placed.status_code == 303, placed.text
        (new,) = await _hold_ids(api) - holds_before
        released = await http.post(f"/console/holds/{new}/release", data={"csrf": csrf})
        assert released.status_code == 303
        assert await _hold_ids(api) == holds_before

        submitted = await http.post("/console/requests/new", data=subject | {"csrf": csrf})
        assert submitted.status_code == 303, submitted.text
        assert submitted.headers["location"] == f"/console/requests/{request_id}"
        assert patient.patient_id not in submitted.headers["location"]
        assert await _exists(api, request_id)
        await _state(api, request_id, "awaiting_approval")
        refused = await http.post(
            f"/console/requests/{request_id}/reject", data={"note": "a test", "csrf": "x"}
        )
        assert refused.status_code == 403
        assert (await _state(api, request_id, "awaiting_approval"))["status"]["approval"] is None
        rejected = await http.post(
            f"/console/requests/{request_id}/reject", data={"note": "a test", "csrf": csrf}
        )
        assert rejected.status_code == 303
        done = await _state(api, request_id, "rejected")
        assert done["status"]["approval"]["by"] == "dpo-a"


async def test_a_subject_hold_from_the_console_keeps_only_the_reference(api: Api) -> None:
    patient = api.hospital.patients[1]
    async with _signed_in(api, "dpo-a") as (http, csrf):
        before = await _hold_ids(api)
        form = {"matter": "Case 12", "scope": "subject", "reason": "subpoena", "csrf": csrf}
        missing = await http.post("/console/holds", data=form)
        assert missing.status_code == 422  # a subject hold needs the subject
        assert "subject" in missing.text
        placed = await http.post("/console/holds", data=form | {"subject_id": patient.patient_id})
        assert placed.status_code == 303, placed.text
        (new,) = await _hold_ids(api) - before
        page = await http.get("/console/holds")
        assert "Case 12" in page.text
        assert patient.patient_id not in page.text
        async with api.client("dpo-a") as bearer:
            held = [h for h in (await bearer.get("/v1/holds")).json() if h["id"] == new]
        assert held[0]["value"] == api.hospital.ref(patient)
        assert held[0]["tenant"] == api.tenant("A")
        async with _signed_in(api, "dpo-b") as (other, other_csrf):
            assert "Case 12" not in (await other.get("/console/holds")).text
            stolen = await other.post(f"/console/holds/{new}/release", data={"csrf": other_csrf})
            assert stolen.status_code == 404
        released = await http.post(f"/console/holds/{new}/release", data={"csrf": csrf})
        assert released.status_code == 303
        assert new not in await _hold_ids(api)


async def test_a_wrong_token_at_sign_in_is_refused_and_slowed(api: Api) -> None:
    async with api.client(follow_redirects=False) as http:
        took = []
        for n in range(3):
            wrong = f"lethe_tok_00000000000{n}_not-a-secret"
            form = await http.get("/console/sign-in")
            started = time.monotonic()
            refused = await http.post(
                "/console/sign-in", data={"token": wrong, "csrf": _csrf(form.text)}
            )
            took.append(time.monotonic() - started)
            assert refused.status_code == 401
            assert "not valid" in refused.text
            assert SESSION_COOKIE not in refused.headers.get("set-cookie", "")
            assert wrong not in refused.text
        # Each failure from one address doubles the wait of the next (0.25 s after the first,
        # 0.5 s after the second).
        assert took[1] >= took[0] + 0.2, took
        assert took[2] >= took[1] + 0.2, took
        assert took[2] >= 0.45, took


async def test_the_console_keeps_the_api_s_grants_and_tenants(api: Api) -> None:
    patient = api.hospital.patients[3]
    async with api.client("dpo-a") as bearer:
        submitted = await bearer.post(
            "/v1/erasures",
            json={
                "subject": {
                    "tenant": api.tenant("A"),
                    "subject_id": patient.patient_id,
                    "identities": {"email": patient.email},
                }
            },
        )
        assert submitted.status_code == 202
    request_id = submitted.json()["id"]
    await _state(api, request_id, "awaiting_approval")
    async with _signed_in(api, "auditor-a") as (auditor, auditor_csrf):
        page = await auditor.get(f"/console/requests/{request_id}")
        assert page.status_code == 200
        assert 'action="/console/requests/' not in page.text  # no decision forms for an auditor
        refused = await auditor.post(
            f"/console/requests/{request_id}/approve", data={"csrf": auditor_csrf}
        )
        assert refused.status_code == 403
        assert (await auditor.get("/console/requests/new")).status_code == 403
    async with _signed_in(api, "dpo-b") as (other, other_csrf):
        assert (await other.get(f"/console/requests/{request_id}")).status_code == 404
        assert request_id not in (await other.get("/console")).text
        stolen = await other.post(
            f"/console/requests/{request_id}/reject", data={"csrf": other_csrf}
        )
        assert stolen.status_code == 404
    async with _signed_in(api, "dpo-a") as (http, csrf):
        # An extension is one or two months, with a reason; its page shows it.
        extend = f"/console/requests/{request_id}/extend"
        too_long = await http.post(extend, data={"months": "3", "reason": "volume", "csrf": csrf})
        assert too_long.status_code == 422
        assert "months" in too_long.text
        extended = await http.post(
            extend, data={"months": "2", "reason": "many requests this month", "csrf": csrf}
        )
        assert extended.status_code == 303, extended.text
        async with asyncio.timeout(30):
            page = await http.get(f"/console/requests/{request_id}")
            while "extended 2 months by dpo-a: many requests this month" not in page.text:
                await asyncio.sleep(0.3)
                page = await http.get(f"/console/requests/{request_id}")
        assert f'action="{extend}"' not in page.text  # one extension only
        queue = await http.get("/console")
        assert "2 months" in queue.text
        rejected = await http.post(f"/console/requests/{request_id}/reject", data={"csrf": csrf})
        assert rejected.status_code == 303
    await _state(api, request_id, "rejected")


async def test_console_pages_have_a_csp_and_no_inline_script_style_or_outside_address(
    api: Api,
) -> None:
    async with api.client("dpo-a") as bearer:
        listed = await bearer.get("/v1/erasures")
        some_request = listed.json()[0]["id"]
        # Without the e-mail its plan fails: a failed request has a page too.
        patient = api.hospital.patients[0]
        subject = {"tenant": api.tenant("A"), "subject_id": patient.patient_id}
        failed = (await bearer.post("/v1/erasures", json={"subject": subject})).json()["id"]
    async with _signed_in(api, "dpo-a") as (http, _), asyncio.timeout(60):
        page = await http.get(f"/console/requests/{failed}")
        while "PlanningFailed" not in page.text:
            await asyncio.sleep(0.3)
            page = await http.get(f"/console/requests/{failed}")
    paths = [
        "/console",
        "/console?state=awaiting_approval",
        "/console/requests/new",
        f"/console/requests/{some_request}",
        f"/console/requests/{failed}",
        "/console/requests/erasure-00000000000000000000000000000000",
        "/console/holds",
        "/console/ledger",
        "/console/retention",
    ]
    async with _signed_in(api, "dpo-a") as (http, _):
        pages = [await http.get(path) for path in paths]
        pages.append(await http.get("/console/sign-in"))
    for path, page in zip([*paths, "/console/sign-in"], pages, strict=True):
        assert page.status_code in (200, 404), (path, page.status_code)
        assert page.headers["content-type"].startswith("text/html"), path
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "style-src 'self'" in csp, path
        assert page.headers["cache-control"] == "no-store", path
        assert not INLINE_SCRIPT.findall(page.text), path
        assert not STYLE_ATTRIBUTE.findall(page.text), path
        assert "<style" not in page.text.lower(), path
        assert not OUTSIDE.findall(page.text), path
        assert '<html lang="en">' in page.text and "<h1>" in page.text, path
        assert "<th>" not in page.text, path  # every header cell has a scope
    assert "None yet." in pages[paths.index("/console/retention")].text
    async with api.client() as anonymous:
        for asset in ("/static/lethe.css", "/static/console.js"):
            answer = await anonymous.get(asset)
            assert answer.status_code == 200, asset
            assert not re.search(r"https?:|@import|url\(", answer.text), asset


async def test_no_subject_id_in_any_access_log_line(api: Api) -> None:
    lines = api.log.lines
    assert any("/console/requests/" in line for line in lines)  # the log is being read
    for patient in api.hospital.patients:
        assert not [line for line in lines if patient.patient_id in line]
        assert not [line for line in lines if patient.email in line]


def _row(state: str, deadline: timedelta, *, overdue: bool = False) -> dict[str, object]:
    now = datetime.now(UTC)
    listed = RequestListed(
        id=f"erasure-{state}{deadline.days}", tenant="t", state=state, running=True
    )
    status = ErasureStatus(
        request_id=listed.id,
        subject_ref="ref",
        state=state,
        received_at=now - timedelta(days=20),
        deadline=now + deadline,
        overdue=overdue,
    )
    return {"listed": listed, "status": status, "due": console._due(listed, status, now)}


def test_overdue_and_due_this_week_rows_stand_out_in_words_not_colour_alone() -> None:
    rows = [
        _row("erasing", timedelta(days=-1)),
        _row("awaiting_approval", timedelta(days=3)),
        _row("erasing", timedelta(days=20)),
        _row("completed", timedelta(days=-5)),
        _row("waiting_window", timedelta(days=9), overdue=True),
    ]
    assert [row["due"] for row in rows] == ["overdue", "soon", "", "", "overdue"]
    page = console.templates.get_template("console/queue.html").render(
        user=Principal("dpo", "dpo", "t", "session"),
        csrf="c",
        path="/console",
        rows=rows,
        states=console.STATES,
        state="",
    )
    body = [tr for tr in re.findall(r"<tr[^>]*>.*?</tr>", page, re.DOTALL)][1:]
    assert ['class="due-overdue"' in tr and "Overdue</span>" in tr for tr in body] == [
        True,
        False,
        False,
        False,
        True,
    ]
    assert ['class="due-soon"' in tr and "Due within 7 days</span>" in tr for tr in body] == [
        False,
        True,
        False,
        False,
        False,
    ]


def test_a_step_s_legal_bases_are_each_named_once() -> None:
    decisions = [
        Decision(rule="a", strategy="delete", citation="GDPR Art. 17(1)"),
        Decision(rule="b", strategy="delete", citation="GDPR Art. 17(1); Art. 5(1)(e)"),
    ]
    assert pages.legal_bases(decisions) == "GDPR Art. 17(1); Art. 5(1)(e)"


def test_the_sign_in_page_offers_the_organisation_s_sign_in_only_when_oidc_is_set() -> None:
    form = console.templates.get_template("console/sign_in.html")
    values = {"user": None, "csrf": "", "path": "/console/sign-in", "message": ""}
    with_oidc = form.render(values | {"sign_in_csrf": "c", "oidc": True})
    assert '<a href="/console/oidc/login">Sign in with your organisation</a>' in with_oidc
    assert "/console/oidc/login" not in form.render(values | {"sign_in_csrf": "c", "oidc": False})
