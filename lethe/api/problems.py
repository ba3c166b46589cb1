"""Errors as RFC 9457 problem documents (`application/problem+json`).

A problem names the field and what is wrong with it, never the value it was given: personal data
in a request body stays out of the answer and out of the logs.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from lethe.kernel.errors import LetheError, ServiceUnavailable

MEDIA_TYPE = "application/problem+json"
_STATUSES = {status.value for status in HTTPStatus}
log = logging.getLogger("lethe.api")


class FieldProblem(BaseModel):
    """One field of the request and what is wrong with it."""

    field: str
    problem: str


class Problem(BaseModel):
    """An RFC 9457 problem document."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str = ""
    errors: list[FieldProblem] = []


class ProblemError(Exception):
    """Raised by endpoints to answer with a problem document."""

    def __init__(
        self, status: int, title: str, detail: str = "", headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(title)
        self.problem = Problem(title=title, status=status, detail=detail)
        self.headers = headers


_DECLARED: dict[int, str] = {
    400: "The body cannot be read (not JSON, not UTF-8), or Lethe refused the request (the "
    "title names the reason)",
    401: "No valid credentials: a bearer token, an OIDC token or a session",
    403: "The role may not do this, or the request names another tenant",
    404: "No such object, or not one this principal may see (the same answer for both)",
    409: "The object is not in a state that allows this (settled, failed, still running)",
    422: "The request does not have the expected shape (`errors` names the fields), or was "
    "refused as a whole",
    503: "A service Lethe needs does not answer",
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI declarations of the problem documents an endpoint may answer with."""
    schema = {"$ref": "#/components/schemas/Problem"}
    return {
        status: {"description": _DECLARED[status], "content": {MEDIA_TYPE: {"schema": schema}}}
        for status in statuses
    }


EVERY_ENDPOINT = (400, 401, 403, 422, 503)
"""What any endpoint that needs a principal may answer: an unreadable body, no principal, no
grant, a bad shape, a service down."""


def not_found(what: str) -> ProblemError:
    """404: there is no such object, or it is another tenant's (the same answer for both)."""
    return ProblemError(404, "Not Found", f"no {what} with this id is visible to you")


STATUS_OF: dict[str, int] = {
    "UnknownRequest": 404,
    "UnknownHold": 404,
    "UnknownToken": 404,
    "UnknownSweep": 404,
    "UnknownWorkflow": 404,
    "OutOfScope": 403,
    "RetryRefused": 409,
    "RequestFailed": 409,
    "TokenRefused": 422,
    "BulkRefused": 422,
    "UnknownTenant": 422,
    "PlanningFailed": 422,
}


def _answer(problem: Problem, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        problem.model_dump(exclude_defaults=False),
        status_code=problem.status,
        media_type=MEDIA_TYPE,
        headers=headers,
    )


def _location(loc: tuple[object, ...]) -> str:
    return ".".join(str(part) for part in loc)


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        FieldProblem(field=_location(tuple(error["loc"])), problem=str(error["msg"]))
        for error in exc.errors()
    ]
    return _answer(
        Problem(
            title="Unprocessable Content",
            status=422,
            detail="the request does not have the expected shape: see errors",
            errors=errors,
        )
    )


async def _problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return _answer(exc.problem, exc.headers)


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else ""
    title = HTTPStatus(exc.status_code).phrase if exc.status_code in _STATUSES else "Error"
    return _answer(
        Problem(title=title, status=exc.status_code, detail=detail),
        dict(exc.headers) if exc.headers else None,
    )


def of_error(exc: LetheError) -> Problem:
    """The problem document for one of Lethe's errors (its text never quotes personal data)."""
    name = type(exc).__name__
    status = 503 if isinstance(exc, ServiceUnavailable) else STATUS_OF.get(name, 400)
    return Problem(title=name, status=status, detail=str(exc))


async def _lethe(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LetheError)
    return _answer(of_error(exc))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The exception's text may quote anything; only its type reaches the log and the answer.
    log.error("unexpected %s on %s %s", type(exc).__name__, request.method, request.url.path)
    return _answer(Problem(title="Internal Server Error", status=500, detail=type(exc).__name__))


def _schemas() -> dict[str, Any]:
    """Problem and FieldProblem as OpenAPI component schemas."""
    schema = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    return {**schema.pop("$defs"), "Problem": schema}


def install(app: FastAPI) -> None:
    """Answer every error of `app` with a problem document, and put the problem document's
    schema in `app`'s OpenAPI document (for the routers' `responses(...)`)."""
    generate = app.openapi

    def documented() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()
            document.setdefault("components", {}).setdefault("schemas", {}).update(_schemas())
        return app.openapi_schema or {}

    app.openapi = documented  # type: ignore[method-assign]
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(ProblemError, _problem)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(LetheError, _lethe)
    app.add_exception_handler(Exception, _unexpected)
