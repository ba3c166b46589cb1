"""The web console (`/console`): a DPO's queue, a request with its plan and live progress, legal
holds, the ledger's verification and retention runs, as server-rendered pages.

No operation is implemented here: every page calls the API's own endpoint functions (the same
SDK and evidence calls, the same `visible` check), under the same grants (`Principal.may`) and
tenant scope (`tenancy.scoped`). Sign-in is by an API token or an OIDC JWT through the
application's `Authenticator`; the session is its signed cookie, and every form carries the
session's CSRF token (checked by the API's `principal` dependency). Subject ids travel only in
POST bodies: no URL, redirect or log line holds one.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, cast, get_args

from fastapi import APIRouter, Depends, Form, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError

from lethe.api import erasures, holds, ledger, operations
from lethe.api.auth import Authenticator, principal
from lethe.api.pages import environment
from lethe.api.principals import Action, Principal
from lethe.api.problems import STATUS_OF, ProblemError
from lethe.api.sessions import SESSION_COOKIE, Session
from lethe.contracts import ErasureState, ErasureStatus, Subject
from lethe.kernel import tenancy
from lethe.kernel.errors import LetheError, ServiceUnavailable
from lethe.sdk import requests
from lethe.sdk.client import SETTLED_STATES, RequestFailed

SIGN_IN_COOKIE = "lethe_sign_in"
QUEUE_ROWS = 50
DUE_SOON = timedelta(days=7)
STATUS_WAIT_SECONDS = 3.0
STATES: tuple[str, ...] = get_args(ErasureState)
HOLD_SCOPES = ("subject", "tenant", "system", "category")
TITLES = {
    400: "Not done",
    401: "Sign in again",
    403: "Not allowed",
    404: "Not found",
    409: "Conflict",
    422: "Check the form",
    503: "Unavailable",
}

templates = environment.overlay()


def _when(moment: datetime | None, fmt: str = "%Y-%m-%d %H:%M") -> str:
    return moment.astimezone(UTC).strftime(fmt) if moment else "—"


templates.filters["when"] = _when
templates.filters["day"] = lambda moment: _when(moment, "%Y-%m-%d")


class SignIn(Exception):
    """The console needs a session: answer with a redirect to the sign-in page."""


class ConsoleRoute(APIRoute):
    """A console route: errors become HTML pages (or the sign-in page), not problem documents."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """The route's handler, answering the console's errors with a page."""
        handle = super().get_route_handler()

        async def answered(request: Request) -> Response:
            try:
                return await handle(request)
            except SignIn:
                return RedirectResponse("/console/sign-in", status_code=303)
            except ProblemError as exc:
                return _error(request, exc.problem.status, exc.problem.detail, exc.headers)
            except LetheError as exc:
                return _error(request, _status_of(exc), f"{type(exc).__name__}: {exc}")
            except RequestValidationError as exc:
                return _error(request, 422, _fields(exc.errors()))

        return answered


router = APIRouter(prefix="/console", route_class=ConsoleRoute, include_in_schema=False)


def _status_of(exc: LetheError) -> int:
    """The status the API answers this error with."""
    return 503 if isinstance(exc, ServiceUnavailable) else STATUS_OF.get(type(exc).__name__, 400)


def _fields(errors: Iterable[Any]) -> str:
    """The fields a form got wrong, named, never quoted."""
    names = [str(error["loc"][-1]) for error in errors if error.get("loc")]
    return "check these fields: " + ", ".join(sorted(set(names))) if names else "check the form"


def _auth(request: Request) -> Authenticator:
    found: Authenticator = request.app.state.auth
    return found


def _session(request: Request) -> Session | None:
    cookie = request.cookies.get(SESSION_COOKIE)
    return _auth(request).sessions.read(cookie) if cookie else None


def _page(request: Request, template: str, status: int = 200, **values: Any) -> HTMLResponse:
    """A console page rendered for the signed-in user (if any)."""
    session = _session(request)
    html = templates.get_template(f"console/{template}").render(
        user=session.principal if session else None,
        csrf=session.csrf if session else "",
        path=request.url.path,
        **values,
    )
    return HTMLResponse(html, status_code=status)


def _error(
    request: Request, status: int, detail: str, headers: dict[str, str] | None = None
) -> HTMLResponse:
    page = _page(request, "error.html", status, title=TITLES.get(status, "Error"), detail=detail)
    if headers:
        page.headers.update(headers)
    return page


async def signed_in(request: Request) -> AsyncIterator[Principal]:
    """The session's principal (CSRF checked on POST by the API's `principal`), its tenant scope
    held while the page runs; without a session, the sign-in page."""
    if _session(request) is None:
        raise SignIn
    found = await principal(request, None)
    with tenancy.scoped(found.scope):
        yield found


User = Annotated[Principal, Depends(signed_in)]


def _allowed(user: Principal, action: Action) -> None:
    if not user.may(action):
        raise ProblemError(403, "Forbidden", f"the {user.role} role may not {action}")


def _see_other(path: str) -> RedirectResponse:
    return RedirectResponse(path, status_code=303)


# --- signing in and out -----------------------------------------------------------------------


def _sign_in_page(request: Request, message: str = "", status: int = 200) -> HTMLResponse:
    """The sign-in form with a fresh pre-session CSRF token (a cookie and a hidden field)."""
    token = secrets.token_urlsafe(24)
    page = _page(
        request,
        "sign_in.html",
        status,
        sign_in_csrf=token,
        message=message,
        oidc=_auth(request).oidc is not None,
    )
    page.set_cookie(
        SIGN_IN_COOKIE,
        token,
        max_age=3600,
        httponly=True,
        secure=_auth(request).sessions.secure,
        samesite="strict",
        path="/console/sign-in",
    )
    return page


@router.get("/sign-in", response_class=HTMLResponse)
async def sign_in_form(request: Request) -> HTMLResponse:
    """The sign-in page: a token, or the organisation's sign-in when OIDC is set."""
    return _sign_in_page(request)


@router.post("/sign-in", response_class=HTMLResponse)
async def sign_in(
    request: Request,
    token: Annotated[str, Form(max_length=4096)] = "",
    csrf: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    """Start a session for a valid token; a failure is slowed like the API's."""
    expected = request.cookies.get(SIGN_IN_COOKIE, "")
    if not expected or not secrets.compare_digest(expected, csrf):
        return _sign_in_page(request, "The form expired: sign in again.", 403)
    auth = _auth(request)
    found = await auth.from_secret(token.strip()) if token.strip() else None
    if found is None:
        await auth.refuse(request, "sign-in refused")
        return _sign_in_page(request, "That token is not valid (or it expired).", 401)
    answer = _see_other("/console")
    auth.sessions.issue(answer, found)
    answer.delete_cookie(SIGN_IN_COOKIE, path="/console/sign-in")
    return answer


@router.post("/sign-out")
async def sign_out(request: Request, user: User) -> Response:
    """End the session (the form carries the CSRF token)."""
    answer = _see_other("/console/sign-in")
    _auth(request).sessions.end(answer)
    return answer


# --- the queue ----------------------------------------------------------------------------------


def _due(item: requests.RequestListed, status: ErasureStatus | None, now: datetime) -> str:
    """`overdue`, `soon` (due within 7 days) or '' (settled, or not due soon)."""
    if status is not None:
        if status.state in SETTLED_STATES:
            return ""
        if status.overdue:
            return "overdue"
    deadline = status.deadline if status else item.deadline
    if deadline is None or not item.running:
        return ""
    if deadline <= now:
        return "overdue"
    return "soon" if deadline - now <= DUE_SOON else ""


async def _status_or_none(request: Request, request_id: str) -> ErasureStatus | None:
    """The request's status, or None when it has none to give soon (failed, or no worker
    answers its query): its row then shows what the listing knows."""
    try:
        async with asyncio.timeout(STATUS_WAIT_SECONDS):
            return await erasures.status_of(request, request_id)
    except (LetheError, TimeoutError):
        return None


@router.get("", response_class=HTMLResponse)
async def queue(request: Request, user: User, state: str = "") -> HTMLResponse:
    """The queue: requests of the user's tenant, newest first, deadlines standing out."""
    if not user.may("erasure.read"):
        return _page(request, "home.html")
    chosen = cast(ErasureState, state) if state in STATES else None
    listed = await erasures.list_requests(
        request, user, tenant=None, state=chosen, region=None, since=None, limit=QUEUE_ROWS
    )
    statuses = await asyncio.gather(*(_status_or_none(request, r.id) for r in listed))
    now = datetime.now(UTC)
    rows = [
        {"listed": item, "status": status, "due": _due(item, status, now)}
        for item, status in zip(listed, statuses, strict=True)
    ]
    return _page(request, "queue.html", rows=rows, states=STATES, state=chosen or "")


# --- one request ------------------------------------------------------------------------------


@router.get("/requests/new", response_class=HTMLResponse)
async def new_request(request: Request, user: User) -> HTMLResponse:
    """The form to submit an erasure for the user's tenant."""
    _allowed(user, "erasure.submit")
    return _page(request, "new.html", problem="", reason="")


def _identities(email: str, identity_name: str, identity_value: str) -> dict[str, str]:
    found = {"email": email.strip()} if email.strip() else {}
    if identity_name.strip() and identity_value.strip():
        found[identity_name.strip()] = identity_value.strip()
    return found


@router.post("/requests/new", response_class=HTMLResponse)
async def submit_request(
    request: Request,
    user: User,
    subject_id: Annotated[str, Form(max_length=256)] = "",
    email: Annotated[str, Form(max_length=512)] = "",
    identity_name: Annotated[str, Form(max_length=31)] = "",
    identity_value: Annotated[str, Form(max_length=512)] = "",
    reason: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    """Submit the erasure (as the API's POST /v1/erasures) and show its page."""
    _allowed(user, "erasure.submit")
    try:
        body = erasures.ErasureSubmit(
            subject=Subject(
                tenant=user.tenant or "",
                subject_id=subject_id.strip(),
                identities=_identities(email, identity_name, identity_value),
            ),
            reason=reason.strip(),
        )
    except ValidationError as exc:
        problem = _fields(exc.errors())
        return _page(request, "new.html", 422, problem=problem, reason=reason)
    accepted = await erasures.submit(body, request, user)
    return _see_other(f"/console/requests/{accepted.id}")


@router.get("/requests/{request_id}", response_class=HTMLResponse)
async def request_page(request: Request, request_id: str, user: User) -> HTMLResponse:
    """A request: its state, plan with legal bases, decisions, live progress, certificate."""
    try:
        view = await erasures.status(request_id, request, user)
    except RequestFailed as exc:
        # Visible (checked first by `status`) but without a status: it ended in a failure.
        owner = await erasures.visible(erasures.client_of(request), user, request_id)
        return _page(request, "failed.html", request_id=request_id, owner=owner, problem=str(exc))
    plan = await erasures.plan_of(request_id, request, user)
    progress = {step.step_id: step for step in view.status.steps}
    return _page(
        request,
        "request.html",
        view=view,
        s=view.status,
        plan=plan,
        progress=progress,
        settled=view.status.state in SETTLED_STATES,
        certified=view.status.state in ("completed", "rejected"),
        may_decide=user.may("erasure.decide"),
        may_certificate=user.may("certificate.read"),
    )


@router.post("/requests/{request_id}/approve")
async def approve(
    request: Request,
    request_id: str,
    user: User,
    note: Annotated[str, Form(max_length=1000)] = "",
) -> Response:
    """Approve (as the API's approve) and show the request."""
    _allowed(user, "erasure.decide")
    await erasures.approve(request_id, erasures.Note(note=note), request, user)
    return _see_other(f"/console/requests/{request_id}")


@router.post("/requests/{request_id}/reject")
async def reject(
    request: Request,
    request_id: str,
    user: User,
    note: Annotated[str, Form(max_length=1000)] = "",
) -> Response:
    """Reject (as the API's reject) and show the request."""
    _allowed(user, "erasure.decide")
    await erasures.reject(request_id, erasures.Note(note=note), request, user)
    return _see_other(f"/console/requests/{request_id}")


@router.post("/requests/{request_id}/extend")
async def extend(
    request: Request,
    request_id: str,
    user: User,
    months: Annotated[int, Form(ge=1, le=2)],
    reason: Annotated[str, Form(min_length=3, max_length=1000)],
) -> Response:
    """Extend the deadline by one or two months, with the reason."""
    _allowed(user, "erasure.decide")
    asked = erasures.ExtensionAsked(months=months, reason=reason)
    await erasures.extend(request_id, asked, request, user)
    return _see_other(f"/console/requests/{request_id}")


# --- holds, ledger, retention -----------------------------------------------------------------


@router.get("/holds", response_class=HTMLResponse)
async def holds_page(request: Request, user: User) -> HTMLResponse:
    """Legal holds of the user's tenant, and the form to place one."""
    _allowed(user, "holds.read")
    return await _holds_page(request, user)


async def _holds_page(
    request: Request, user: Principal, status: int = 200, problem: str = ""
) -> HTMLResponse:
    found = await holds.list_holds(request, user, include_released=False)
    return _page(
        request,
        "holds.html",
        status,
        holds=found,
        scopes=HOLD_SCOPES,
        may_write=user.may("holds.write"),
        problem=problem,
    )


@router.post("/holds", response_class=HTMLResponse)
async def place_hold(
    request: Request,
    user: User,
    matter: Annotated[str, Form(max_length=200)] = "",
    scope: Annotated[str, Form(max_length=20)] = "",
    reason: Annotated[str, Form(max_length=1000)] = "",
    value: Annotated[str, Form(max_length=200)] = "",
    subject_id: Annotated[str, Form(max_length=256)] = "",
) -> Response:
    """Place a hold (as the API's POST /v1/holds)."""
    _allowed(user, "holds.write")
    subject = None
    if scope == "subject":
        subject = {"tenant": user.tenant or "", "subject_id": subject_id.strip()}
    try:
        body = holds.HoldPlace.model_validate(
            {
                "matter": matter.strip(),
                "scope": scope,
                "reason": reason.strip(),
                "value": (value.strip() or None) if scope != "subject" else None,
                "subject": subject,
            }
        )
    except ValidationError as exc:
        return await _holds_page(request, user, 422, _fields(exc.errors()))
    await holds.place(body, request, user)
    return _see_other("/console/holds")


@router.post("/holds/{hold_id}/release")
async def release_hold(request: Request, hold_id: str, user: User) -> Response:
    """Release a hold (as the API's release)."""
    _allowed(user, "holds.write")
    await holds.release(hold_id, request, user)
    return _see_other("/console/holds")


@router.get("/ledger", response_class=HTMLResponse)
async def ledger_page(request: Request, user: User) -> HTMLResponse:
    """Whether the ledger's chain holds, and the tenant's latest entries."""
    _allowed(user, "ledger.read")
    verified = await ledger.verify(request, user)
    answer = await ledger.entries(
        request,
        user,
        tenant=None,
        request_id=None,
        action=None,
        since=None,
        until=None,
        before_seq=None,
        limit=QUEUE_ROWS,
    )
    page = ledger.LedgerPage.model_validate_json(bytes(answer.body))
    return _page(request, "ledger.html", verified=verified, entries=page.entries)


@router.get("/retention", response_class=HTMLResponse)
async def retention_page(request: Request, user: User) -> HTMLResponse:
    """The latest retention runs (read-only)."""
    _allowed(user, "retention.read")
    runs = await operations.retention_runs(request, user, limit=20)
    return _page(request, "retention.html", runs=runs)
