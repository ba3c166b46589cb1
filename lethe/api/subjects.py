"""A subject's standing, looked up by POST (a subject's id never goes in a URL): its reference,
its request, whether it is on the forget-list; and the forget-list itself, by reference."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from lethe.api.auth import require
from lethe.api.bodies import Body
from lethe.api.erasures import client_of
from lethe.api.principals import Principal
from lethe.api.problems import EVERY_ENDPOINT, ProblemError, responses
from lethe.contracts import TENANT_PATTERN
from lethe.evidence.forget_list import ForgetListEntry
from lethe.sdk import requests
from lethe.sdk.client import UnknownRequest

router = APIRouter(tags=["subjects"], responses=responses(*EVERY_ENDPOINT))


class SubjectLookup(Body):
    """Whom to look up; the subject travels only in this body."""

    tenant: str = Field(pattern=TENANT_PATTERN)
    subject_id: str = Field(min_length=1, max_length=256)


class SubjectStanding(BaseModel):
    """What Lethe holds about a subject: references and facts only."""

    subject_ref: str
    request: str | None = None
    """The subject's erasure request, if there is one."""
    forget_listed: bool
    erased_at: datetime | None = None


class ForgetListed(BaseModel):
    """A forget-list entry as the API shows it (its sealed copy of the subject stays inside)."""

    subject_ref: str
    tenant: str
    request_id: str
    systems: list[str]
    erased_at: datetime


def _shown(entry: ForgetListEntry) -> ForgetListed:
    return ForgetListed.model_validate(entry.model_dump(include=set(ForgetListed.model_fields)))


@router.post("/v1/subjects/lookup", response_model=SubjectStanding)
async def lookup(
    body: SubjectLookup,
    request: Request,
    principal: Annotated[Principal, Depends(require("subjects.lookup"))],
) -> SubjectStanding:
    """A subject's reference, request and forget-list standing."""
    if not principal.sees(body.tenant):
        raise ProblemError(403, "Forbidden", f"this principal acts for tenant {principal.tenant}")
    client = client_of(request)
    ref = client.subject_ref(body.tenant, body.subject_id)
    workflow_id: str | None = client.workflow_id(body.tenant, body.subject_id)
    try:
        await requests.owner(client, workflow_id or "")
    except UnknownRequest:
        workflow_id = None
    listed = {entry.subject_ref: entry for entry in await client.forget_list()}
    entry = listed.get(ref)
    return SubjectStanding(
        subject_ref=ref,
        request=workflow_id,
        forget_listed=entry is not None,
        erased_at=entry.erased_at if entry else None,
    )


@router.get("/v1/forget-list", response_model=list[ForgetListed])
async def forget_list(
    request: Request,
    principal: Annotated[Principal, Depends(require("forget.read"))],
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[ForgetListed]:
    """Erased subjects by reference, newest first (only this principal's tenant's)."""
    entries = await client_of(request).forget_list()
    entries.sort(key=lambda entry: entry.erased_at, reverse=True)
    return [_shown(entry) for entry in entries[:limit]]
