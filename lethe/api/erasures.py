"""Erasure requests over HTTP: submit (one subject or many), plan, list, status (polled or
followed by Server-Sent Events), approve, reject, extend, recheck, and the certificate.

Requests are addressed by their id (`erasure-<subject reference>`), never by a subject's id; a
principal sees only its tenant's requests (a service: only those it submitted), and 404 for any
other, as for one that does not exist.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine

from lethe.api.auth import require
from lethe.api.bodies import TEXT, Body, Moment
from lethe.api.kept import Kept
from lethe.api.pages import certificate_page
from lethe.api.principals import Principal
from lethe.api.problems import EVERY_ENDPOINT, ProblemError, not_found, of_error, responses
from lethe.contracts import (
    ApprovalDecision,
    Certificate,
    DryRun,
    ErasureRequest,
    ErasureState,
    ErasureStatus,
    Extension,
    Plan,
    Subject,
)
from lethe.kernel.errors import LetheError
from lethe.sdk import bulk, requests
from lethe.sdk.client import SETTLED_STATES, Client, UnknownRequest

router = APIRouter(prefix="/v1/erasures", tags=["erasures"], responses=responses(*EVERY_ENDPOINT))
FOLLOW_EVERY_SECONDS = 1.0
STATUS_KEPT_SECONDS = 1.0
STATUS_REFRESHED_SECONDS = 5.0
"""A kept status older than 1 s is given at once while a fresher one is fetched, up to this age."""
FOLLOW_AT_MOST_SECONDS = 3600.0
BULK_MAX_IN_BODY = 10_000
DECIDED = responses(404, 409)
"""A decision: to a request not seen (404), or one that has settled (409)."""


def client_of(request: Request) -> Client:
    """The SDK client the application holds."""
    client: Client = request.app.state.client
    return client


def store_of(request: Request) -> AsyncEngine:
    """Lethe's store as the application reaches it (LETHE_API_STORE_URL's role when set)."""
    store: AsyncEngine = request.app.state.store
    return store


async def status_of(request: Request, request_id: str) -> ErasureStatus:
    """The request's status, kept STATUS_KEPT_SECONDS and then refreshed in the background up to
    STATUS_REFRESHED_SECONDS: readers of one request share one query, and wait for one only when
    none is kept (a decision sent through this server drops it at once)."""
    statuses: Kept[ErasureStatus] = request.app.state.statuses
    return await statuses.get(request_id, lambda: client_of(request).status(request_id))


class ErasureSubmit(Body):
    """A request to erase one subject. The subject travels only in this body."""

    subject: Subject
    region: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9-]{0,30}$")
    reason: str = Field(default="", max_length=500, pattern=TEXT)


class BulkSubject(Body):
    """One subject of a bulk request (the tenant is the request's)."""

    subject_id: str = Field(min_length=1, max_length=256)
    identities: dict[str, str] = Field(default_factory=dict)


class BulkSubmit(Body):
    """A request to erase many subjects of one tenant."""

    tenant: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    subjects: list[BulkSubject] = Field(min_length=1, max_length=BULK_MAX_IN_BODY)
    region: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9-]{0,30}$")
    reason: str = Field(default="", max_length=500, pattern=TEXT)


class Accepted(BaseModel):
    """A long operation that started: follow it at `status`."""

    id: str
    joined: bool = False
    status: str


class RequestView(BaseModel):
    """An erasure request's status with its tenant."""

    id: str
    tenant: str
    requested_by: str
    status: ErasureStatus


class Note(Body):
    """A DPO's note on an approval or a rejection."""

    note: str = Field(default="", max_length=1000, pattern=TEXT)


class ExtensionAsked(Body):
    """An Art. 12(3) extension: one or two months, with the reason."""

    months: int = Field(ge=1, le=2)
    reason: str = Field(min_length=3, max_length=1000, pattern=TEXT)


def _tenant_allowed(principal: Principal, tenant: str) -> None:
    if not principal.sees(tenant):
        raise ProblemError(
            403, "Forbidden", f"this principal acts for tenant {principal.tenant}, not another"
        )


async def visible(client: Client, principal: Principal, request_id: str) -> requests.RequestOwner:
    """The request's owner, if the principal may see the request; else 404."""
    try:
        owner = await requests.owner(client, request_id)
    except UnknownRequest:
        raise not_found("erasure request") from None
    if not principal.sees(owner.tenant):
        raise not_found("erasure request")
    if principal.only_own and owner.requested_by != principal.name:
        raise not_found("erasure request")
    return owner


@router.post("", status_code=202, response_model=Accepted)
async def submit(
    body: ErasureSubmit,
    request: Request,
    principal: Annotated[Principal, Depends(require("erasure.submit"))],
) -> Accepted:
    """Submit an erasure; it starts at once (joining a running one for the same subject)."""
    _tenant_allowed(principal, body.subject.tenant)
    submission = await client_of(request).erase(
        ErasureRequest(
            subject=body.subject,
            region=body.region,
            reason=body.reason,
            requested_by=principal.name,
        )
    )
    return Accepted(
        id=submission.workflow_id,
        joined=submission.joined,
        status=f"/v1/erasures/{submission.workflow_id}",
    )


@router.post("/plan", response_model=DryRun, responses=responses(409))
async def plan(
    body: ErasureSubmit,
    request: Request,
    principal: Annotated[Principal, Depends(require("erasure.submit"))],
) -> DryRun:
    """The plan an erasure would follow, and each step's preflight; nothing is touched."""
    _tenant_allowed(principal, body.subject.tenant)
    return await client_of(request).plan(
        ErasureRequest(
            subject=body.subject,
            region=body.region,
            reason=body.reason,
            requested_by=principal.name,
        )
    )


@router.post("/bulk", status_code=202, response_model=Accepted)
async def submit_bulk(
    body: BulkSubmit,
    request: Request,
    principal: Annotated[Principal, Depends(require("erasure.submit"))],
) -> Accepted:
    """Submit a bulk erasure of one tenant's subjects; it is checked whole, then starts."""
    _tenant_allowed(principal, body.tenant)
    subjects = _bulk_subjects(body)
    bulk_id = await bulk.submit(
        client_of(request),
        tenant=body.tenant,
        subjects=subjects,
        requested_by=principal.name,
        reason=body.reason,
        region=body.region,
    )
    return Accepted(id=bulk_id, status=f"/v1/erasures/bulk/{bulk_id}")


def _bulk_subjects(body: BulkSubmit) -> list[Subject]:
    """The body's subjects, each checked as a Subject is (a printable id, identity names and
    values); a 422 naming the subject's place, as a body's own errors do."""
    found = []
    for place, given in enumerate(body.subjects):
        try:
            found.append(
                Subject(
                    tenant=body.tenant, subject_id=given.subject_id, identities=given.identities
                )
            )
        except ValidationError as exc:
            raise RequestValidationError(
                [
                    {**error, "loc": ("body", "subjects", place, *error["loc"])}
                    for error in exc.errors(include_input=False, include_context=False)
                ]
            ) from None
    return found


@router.get("/bulk/{bulk_id}", responses=responses(404))
async def bulk_progress(
    bulk_id: str,
    request: Request,
    principal: Annotated[Principal, Depends(require("erasure.read"))],
) -> dict[str, object]:
    """A bulk request's progress: counts, batches, phase."""
    try:
        progress = await bulk.progress(client_of(request), bulk_id)
    except LetheError:
        raise not_found("bulk request") from None
    if not principal.sees(progress.tenant):
        raise not_found("bulk request")
    if principal.only_own and await bulk.requester(client_of(request), bulk_id) != principal.name:
        raise not_found("bulk request")
    return progress.model_dump(mode="json")


@router.get("", response_model=list[requests.RequestListed])
async def list_requests(
    request: Request,
    principal: Annotated[Principal, Depends(require("erasure.read"))],
    tenant: Annotated[str | None, Query(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")] = None,
    state: ErasureState | None = None,
    region: Annotated[str | None, Query(pattern=r"^[a-z][a-z0-9-]{0,30}$")] = None,
    since: Moment | None = None,
    limit: Annotated[int, Query(ge=1, le=requests.MAX_LISTED)] = 50,
) -> list[requests.RequestListed]:
    """Erasure requests, newest first: by tenant, state, region and start date."""
    if principal.tenant is not None:
        if tenant not in (None, principal.tenant):
            return []
        tenant = principal.tenant
    client = client_of(request)
    found = await requests.listed(
        client, tenant=tenant, state=state, region=region, since=since, limit=limit
    )
    if principal.only_own:
        owners = await asyncio.gather(*(requests.owner(client, r.id) for r in found))
        found = [r for r, o in zip(found, owners, strict=True) if o.requested_by == principal.name]
    return found


@router.get("/{request_id}", response_model=RequestView, responses=responses(404, 409))
async def status(
    request_id: str,
    request: Request,
    principal: Annotated[Principal, Depends(require("erasure.read"))],
) -> RequestView:
    """Where a request stands, step by step."""
    client = client_of(request)
    owner = await visible(client, principal, request_id)
    return RequestView(
        id=request_id,
        tenant=owner.tenant,
        requested_by=owner.requested_by,
        status=await status_of(request, request_id),
    )


@router.get("/{request_id}/plan", response_model=Plan | None, responses=responses(404))
async def plan_of(
    request_id: str,
    request: Request,
    principal: Annotated[Principal, Depends(require("erasure.read"))],
) -> Plan | None:
    """The plan the request follows: each step's system, action and legal basis (null until
    it is planned)."""
    client = client_of(request)
    await visible(client, principal, request_id)
    return await requests.plan_of(client, request_id)


async def _followed(
    request_id: str,
    request: Request,
    principal: Annotated[Principal, Depends(require("erasure.read"))],
) -> str:
    """The request id once the principal may see it: checked before the stream starts, so an
    unseen request is a 404, not a stream that breaks."""
    await visible(client_of(request), principal, request_id)
    return request_id


@router.get("/{request_id}/events", response_class=EventSourceResponse, responses=responses(404))
async def follow(
    followed: Annotated[str, Depends(_followed)],
    request: Request,
) -> AsyncIterator[ServerSentEvent]:
    """The request's status as Server-Sent Events: one `status` event each time it changes,
    until it settles (then the stream ends); a `problem` event (a problem document) ends it when
    the status cannot be read (a request that failed, say)."""
    last = ""
    deadline = asyncio.get_running_loop().time() + FOLLOW_AT_MOST_SECONDS
    while asyncio.get_running_loop().time() < deadline:
        try:
            current = await status_of(request, followed)
        except LetheError as exc:
            yield ServerSentEvent(event="problem", raw_data=of_error(exc).model_dump_json())
            return
        body = current.model_dump_json()
        if body != last:
            last = body
            yield ServerSentEvent(event="status", raw_data=body)
        if current.state in SETTLED_STATES:
            return
        await asyncio.sleep(FOLLOW_EVERY_SECONDS)


async def _decided(
    request: Request,
    principal: Principal,
    request_id: str,
    signal: Callable[[Client], Awaitable[None]],
) -> Accepted:
    """Send a DPO's decision to a request the principal sees; 409 once it has settled (the
    request exists and is visible: a 404 would say it does not)."""
    client = client_of(request)
    await visible(client, principal, request_id)
    try:
        await signal(client)
    except UnknownRequest:
        raise ProblemError(
            409, "Conflict", "the request has settled: it takes no decision now"
        ) from None
    request.app.state.statuses.forget(request_id)
    return Accepted(id=request_id, status=f"/v1/erasures/{request_id}")


@router.post("/{request_id}/approve", status_code=202, response_model=Accepted, responses=DECIDED)
async def approve(
    request_id: str,
    body: Note,
    request: Request,
    principal: Annotated[Principal, Depends(require("erasure.decide"))],
) -> Accepted:
    """Approve a request waiting for the DPO."""
    decision = ApprovalDecision(by=principal.name, note=body.note)
    return await _decided(
        request, principal, request_id, lambda client: client.approve(request_id, decision)
    )


@router.post("/{request_id}/reject", status_code=202, response_model=Accepted, responses=DECIDED)
async def reject(
    request_id: str,
    body: Note,
    request: Request,
    principal: Annotated[Principal, Depends(require("erasure.decide"))],
) -> Accepted:
    """Reject a request waiting for the DPO."""
    decision = ApprovalDecision(by=principal.name, note=body.note)
    return await _decided(
        request, principal, request_id, lambda client: client.reject(request_id, decision)
    )


@router.post("/{request_id}/extend", status_code=202, response_model=Accepted, responses=DECIDED)
async def extend(
    request_id: str,
    body: ExtensionAsked,
    request: Request,
    principal: Annotated[Principal, Depends(require("erasure.decide"))],
) -> Accepted:
    """Extend the request's deadline by one or two months, with the reason."""
    extension = Extension(months=body.months, reason=body.reason, by=principal.name)
    return await _decided(
        request, principal, request_id, lambda client: client.extend(request_id, extension)
    )


@router.post("/{request_id}/recheck", status_code=202, response_model=Accepted, responses=DECIDED)
async def recheck(
    request_id: str,
    request: Request,
    principal: Annotated[Principal, Depends(require("erasure.decide"))],
) -> Accepted:
    """Run the request's preflight again now, after its problems were fixed."""
    return await _decided(request, principal, request_id, lambda client: client.recheck(request_id))


@router.get("/{request_id}/certificate", response_model=Certificate, responses=responses(404))
async def certificate(
    request_id: str,
    request: Request,
    principal: Annotated[Principal, Depends(require("certificate.read"))],
) -> Certificate:
    """The certificate of a finished request (404 while it runs)."""
    client = client_of(request)
    await visible(client, principal, request_id)
    return await client.certificate(request_id)


@router.get("/{request_id}/certificate.html", response_class=HTMLResponse, responses=responses(404))
async def certificate_html(
    request_id: str,
    request: Request,
    principal: Annotated[Principal, Depends(require("certificate.read"))],
) -> HTMLResponse:
    """The certificate as a printable page."""
    client = client_of(request)
    await visible(client, principal, request_id)
    return HTMLResponse(certificate_page(await client.certificate(request_id)))
