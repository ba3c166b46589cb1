"""Legal holds over HTTP: list, place, release. A tenant's DPO places holds on its own tenant's
data only (a system or category hold of theirs holds only their tenant's steps)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import Field, model_validator

from lethe.api.auth import require
from lethe.api.bodies import NAME, TEXT, Body
from lethe.api.erasures import client_of
from lethe.api.principals import Principal
from lethe.api.problems import EVERY_ENDPOINT, ProblemError, not_found, responses
from lethe.classification.taxonomy import UnknownCategory, category
from lethe.contracts import TENANT_PATTERN, Hold

router = APIRouter(prefix="/v1/holds", tags=["holds"], responses=responses(*EVERY_ENDPOINT))


class HoldSubject(Body):
    """The subject of a subject hold; it travels only in this body and is never stored."""

    tenant: str = Field(pattern=TENANT_PATTERN)
    subject_id: str = Field(min_length=1, max_length=256)


class HoldPlace(Body):
    """A hold to place: on a subject, a tenant, a system or a category."""

    matter: str = Field(min_length=1, max_length=200, pattern=NAME)
    scope: Literal["subject", "tenant", "system", "category"]
    reason: str = Field(min_length=1, max_length=1000, pattern=TEXT)
    value: str | None = Field(default=None, min_length=1, max_length=200, pattern=NAME)
    """The tenant, system or category (not for a subject hold)."""
    subject: HoldSubject | None = None
    """For a subject hold."""

    @model_validator(mode="after")
    def _scope_fits(self) -> HoldPlace:
        if self.scope == "subject" and self.subject is None:
            raise ValueError("a subject hold needs `subject`")
        if self.scope != "subject" and self.value is None:
            raise ValueError(f"a {self.scope} hold needs `value`")
        if self.scope == "category":
            try:
                category(self.value or "")
            except UnknownCategory as exc:
                raise ValueError(str(exc)) from None
        return self


@router.get("", response_model=list[Hold])
async def list_holds(
    request: Request,
    principal: Annotated[Principal, Depends(require("holds.read"))],
    include_released: bool = False,
) -> list[Hold]:
    """Legal holds, active ones unless asked (only this principal's tenant's)."""
    return await client_of(request).list_holds(include_released=include_released)


@router.post("", status_code=201, response_model=Hold)
async def place(
    body: HoldPlace,
    request: Request,
    principal: Annotated[Principal, Depends(require("holds.write"))],
) -> Hold:
    """Place a hold; erasure steps in its scope wait until it is released."""
    client = client_of(request)
    tenant = principal.tenant
    value = body.value or ""
    if body.subject is not None and body.scope == "subject":
        tenant = tenant or body.subject.tenant
        if body.subject.tenant != tenant:
            raise ProblemError(403, "Forbidden", f"this principal acts for tenant {tenant}")
        value = client.subject_ref(body.subject.tenant, body.subject.subject_id)
    if body.scope == "tenant":
        if tenant is not None and value != tenant:
            raise ProblemError(403, "Forbidden", f"this principal acts for tenant {tenant}")
        tenant = value
    return await client.place_hold(
        matter=body.matter,
        scope=body.scope,
        value=value,
        placed_by=principal.name,
        reason=body.reason,
        tenant=tenant,
    )


@router.post("/{hold_id}/release", response_model=Hold, responses=responses(404))
async def release(
    hold_id: str,
    request: Request,
    principal: Annotated[Principal, Depends(require("holds.write"))],
) -> Hold:
    """Release a hold; erasures waiting on it resume."""
    client = client_of(request)
    known = await client.list_holds(include_released=True)
    if not any(hold.id == hold_id for hold in known):
        raise not_found("legal hold")
    return await client.release_hold(hold_id, released_by=principal.name)
