"""The ASGI application of `lethe serve`: the API under `/v1`, the console under `/console`,
its assets under `/static`, the OpenAPI 3.1 document at `/openapi.json`.

One more face over the SDK: every operation is the SDK's (or the evidence layer's), none is
implemented twice. The application holds one SDK client (Temporal, with the codec) and reaches
Lethe's store as LETHE_API_STORE_URL's role when set, so PostgreSQL's row-level security applies.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lethe.api import console, erasures, holds, ledger, oidc_login, operations, problems, subjects
from lethe.api.auth import Authenticator, principal
from lethe.api.erasures import STATUS_KEPT_SECONDS, STATUS_REFRESHED_SECONDS
from lethe.api.kept import Kept
from lethe.api.oidc import OidcVerifier
from lethe.api.pages import STATIC
from lethe.api.principals import Principal
from lethe.api.sessions import Sessions
from lethe.evidence.store import engine_for
from lethe.kernel.config import Settings
from lethe.sdk.client import Client

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "object-src 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


class SecurityHeaders:
    """Adds the security headers to every response, and `no-store` to the API's."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        private = not str(scope.get("path", "")).startswith("/static/")

        async def headed(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.extend(SECURITY_HEADERS)
                if private:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, headed)


class Me(BaseModel):
    """Who the API takes the caller for."""

    name: str
    role: str
    tenant: str | None


class Health(BaseModel):
    """The server answers."""

    ok: bool


def api_settings(settings: Settings) -> Settings:
    """The settings the API runs with: Lethe's store reached as LETHE_API_STORE_URL when set."""
    if settings.api_store_url is None:
        return settings
    return settings.model_copy(update={"store_url": settings.api_store_url})


def create_app(settings: Settings, client: Client | None = None) -> FastAPI:
    """The application; it connects to Temporal and the store when it starts (or uses `client`)."""
    settings = api_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.client = client or await Client.connect(settings)
        app.state.statuses = Kept(STATUS_KEPT_SECONDS, refreshed_until=STATUS_REFRESHED_SECONDS)
        app.state.store = await engine_for(settings.store_url.get_secret_value())
        key = settings.api_session_key
        app.state.auth = Authenticator(
            app.state.store,
            Sessions(
                base64.b64decode(key.get_secret_value()) if key else None,
                secure=not settings.api_insecure_cookies,
            ),
            OidcVerifier(settings) if settings.oidc_issuer else None,
        )
        yield

    app = FastAPI(
        title="Lethe",
        summary="Right-to-erasure, legal holds, retention and audit evidence over HTTP.",
        version="1",
        lifespan=lifespan,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
        swagger_ui_parameters={"syntaxHighlight": False},
    )
    problems.install(app)
    for module in (erasures, holds, ledger, subjects, operations, console):
        app.include_router(module.router)
    app.include_router(oidc_login.router)

    @app.get("/v1/health", response_model=Health, tags=["meta"])
    async def health() -> Health:
        """The server answers (no sign-in needed)."""
        return Health(ok=True)

    @app.get("/v1/me", response_model=Me, tags=["meta"], responses=problems.responses(400, 401))
    async def me(found: Annotated[Principal, Depends(principal)]) -> Me:
        """The principal this request is taken for."""
        return Me(name=found.name, role=found.role, tenant=found.tenant)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(SecurityHeaders)
    return app
