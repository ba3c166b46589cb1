"""Key status and retention runs over HTTP (read-only), and API tokens for admins."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from lethe.api.auth import require
from lethe.api.bodies import NAME, Body
from lethe.api.erasures import client_of, store_of
from lethe.api.principals import Principal
from lethe.api.problems import EVERY_ENDPOINT, responses
from lethe.contracts import TENANT_PATTERN, SweepReport
from lethe.evidence import tokens
from lethe.kernel import tenancy
from lethe.sdk import retention
from lethe.sdk.rotation import KeysReport, keys_report

router = APIRouter(tags=["operations"], responses=responses(*EVERY_ENDPOINT))


@router.get("/v1/keys", response_model=KeysReport)
async def keys(
    request: Request,
    principal: Annotated[Principal, Depends(require("keys.read"))],
) -> KeysReport:
    """KEK versions, data keys per version, shredded subjects, and the rotation's progress."""
    client = client_of(request)
    return await keys_report(client.temporal, client.settings)


@router.get("/v1/retention/runs", response_model=list[SweepReport])
async def retention_runs(
    request: Request,
    principal: Annotated[Principal, Depends(require("retention.read"))],
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
) -> list[SweepReport]:
    """The latest retention sweeps' reports, newest first. A sweep spans tenants and its report
    holds counts per system, no tenant's data: every principal that reads retention sees it."""
    with tenancy.scoped(tenancy.ALL):
        return await retention.recent(client_of(request).settings, limit)


@router.get("/v1/retention/runs/{run_id}", response_model=SweepReport, responses=responses(404))
async def retention_run(
    run_id: str,
    request: Request,
    principal: Annotated[Principal, Depends(require("retention.read"))],
) -> SweepReport:
    """One sweep's report: the kept one once it closed, else its progress so far."""
    client = client_of(request)
    with tenancy.scoped(tenancy.ALL):
        return await retention.report(client.temporal, client.settings, run_id)


class TokenAsked(Body):
    """A token to create."""

    name: str = Field(min_length=1, max_length=200, pattern=NAME)
    role: tokens.Role
    tenant: str | None = Field(default=None, pattern=TENANT_PATTERN)
    days: int = Field(default=90, ge=1, le=366)


class TokenCreated(BaseModel):
    """A new token and its secret, shown this once."""

    token: tokens.ApiToken
    secret: str


@router.post("/v1/tokens", status_code=201, response_model=TokenCreated)
async def create_token(
    body: TokenAsked,
    request: Request,
    principal: Annotated[Principal, Depends(require("tokens.manage"))],
) -> TokenCreated:
    """Create an API token; its secret is in this answer only."""
    store = store_of(request)
    token, secret = await tokens.create(
        store,
        name=body.name,
        role=body.role,
        tenant=body.tenant,
        lifetime=timedelta(days=body.days),
        created_by=principal.name,
    )
    return TokenCreated(token=token, secret=secret)


@router.get("/v1/tokens", response_model=list[tokens.ApiToken])
async def list_tokens(
    request: Request,
    principal: Annotated[Principal, Depends(require("tokens.manage"))],
    include_revoked: bool = False,
) -> list[tokens.ApiToken]:
    """API tokens (never their secrets)."""
    store = store_of(request)
    return await tokens.list_tokens(store, include_revoked=include_revoked)


@router.delete("/v1/tokens/{token_id}", response_model=tokens.ApiToken, responses=responses(404))
async def revoke_token(
    token_id: str,
    request: Request,
    principal: Annotated[Principal, Depends(require("tokens.manage"))],
) -> tokens.ApiToken:
    """Revoke a token: it stops working at once on this server (on others within 5 s)."""
    store = store_of(request)
    revoked = await tokens.revoke(store, token_id, by=principal.name)
    request.app.state.auth.checked.forget()
    return revoked
