"""The audit ledger over HTTP: entries by tenant, request, action and date range (newest first,
a page at a time), and the chain's verification."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel

from lethe.api.auth import require
from lethe.api.bodies import Moment
from lethe.api.erasures import store_of
from lethe.api.principals import Principal
from lethe.api.problems import EVERY_ENDPOINT, responses
from lethe.contracts import TENANT_PATTERN, LedgerEntry
from lethe.evidence import ledger
from lethe.kernel import tenancy

router = APIRouter(prefix="/v1/ledger", tags=["ledger"], responses=responses(*EVERY_ENDPOINT))
PAGE_MAX = 500
PRINTABLE = r"^[!-~]+$"
"""Ids and actions are printable ASCII (a NUL byte is refused here, not by PostgreSQL)."""
SEQ_MAX = 2**31 - 1
"""The largest sequence number the ledger's INTEGER column holds."""


class LedgerPage(BaseModel):
    """A page of entries, newest first; `next` asks for the page after it."""

    entries: list[LedgerEntry]
    next: str | None = None


class ChainVerified(BaseModel):
    """Whether the whole chain holds: no entry altered, removed or reordered."""

    intact: bool
    problems: list[str]
    """Where it breaks, by sequence number (empty when intact)."""


@router.get("", response_model=LedgerPage)
async def entries(
    request: Request,
    principal: Annotated[Principal, Depends(require("ledger.read"))],
    tenant: Annotated[str | None, Query(pattern=TENANT_PATTERN)] = None,
    request_id: Annotated[str | None, Query(max_length=100, pattern=PRINTABLE)] = None,
    action: Annotated[str | None, Query(max_length=100, pattern=PRINTABLE)] = None,
    since: Moment | None = None,
    until: Moment | None = None,
    before_seq: Annotated[int | None, Query(ge=1, le=SEQ_MAX)] = None,
    limit: Annotated[int, Query(ge=1, le=PAGE_MAX)] = 50,
) -> Response:
    """Ledger entries visible to this principal, newest first. The page is serialised once, as
    read (an audit page is 50 entries: validating them again as the answer doubled its cost)."""
    if principal.tenant is not None and tenant not in (None, principal.tenant):
        return _page(LedgerPage(entries=[]))
    found = await ledger.search(
        store_of(request),
        tenant=tenant or principal.tenant,
        request_id=request_id,
        action=action,
        since=since,
        until=until,
        before_seq=before_seq,
        limit=limit,
    )
    following = None
    if len(found) == limit:
        query = request.url.include_query_params(before_seq=found[-1].seq).query
        following = f"{request.url.path}?{query}"
    return _page(LedgerPage(entries=found, next=following))


def _page(page: LedgerPage) -> Response:
    return Response(page.model_dump_json(), media_type="application/json")


@router.get("/verify", response_model=ChainVerified)
async def verify(
    request: Request,
    principal: Annotated[Principal, Depends(require("ledger.read"))],
) -> ChainVerified:
    """Check the whole chain. It spans every tenant, so it is read as a whole; only whether it
    holds (and where not) is answered, never another tenant's entries."""
    store = store_of(request)
    with tenancy.scoped(tenancy.ALL):
        report = await ledger.verify_chain(store)
    return ChainVerified(intact=report.intact, problems=report.problems)
