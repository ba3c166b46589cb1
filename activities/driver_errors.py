"""Every data system's driver errors as Lethe's: one translation for all connectors.

Only an error's type and the driver's code (the DBAPI error's class, Kafka's error name, the
HTTP status and the storage service's code) leave here, never the driver's text: drivers quote
parameters, keys and blob names, which can hold personal data. A system that does not answer is
`ServiceUnavailable` (retryable); a statement or request it refuses is the caller's `refused`
type (not retryable).
"""

from __future__ import annotations

from types import TracebackType
from typing import Literal

from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)
from confluent_kafka import KafkaError, KafkaException
from redis.exceptions import RedisError
from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout

from lethe.activities.common import SchemaMismatch
from lethe.kernel.errors import LetheError, ServiceUnavailable

UNDEFINED = ("42703", "42P01")
"""PostgreSQL's SQLSTATEs for a column or a table that does not exist."""
SQLITE_UNDEFINED = ("no such column", "no such table")
_NOT_ANSWERING: tuple[type[BaseException], ...] = (
    OperationalError,
    InterfaceError,
    DisconnectionError,
    PoolTimeout,
    RedisError,
    KafkaException,
    ServiceRequestError,
    ServiceResponseError,
    OSError,
    TimeoutError,
)
"""Errors that mean the system did not answer (a refusal would be an HTTP or DBAPI error)."""


class DriverRefused(LetheError):
    """A data system refused a request for a reason that retrying will not change."""


class SchemaChanged(SchemaMismatch):
    """A statement named a table or column the database no longer has: it changed after the
    step described it. The step describes the tables again (and runs again if they match)."""

    retryable = True


def undefined_name(exc: BaseException) -> bool:
    """Whether a database refused a statement for naming a table or column it lacks (by
    SQLSTATE, or SQLite's kind of error; the text is read, never repeated)."""
    if not isinstance(exc, DBAPIError) or exc.orig is None:
        return False
    if getattr(exc.orig, "sqlstate", None) in UNDEFINED:
        return True
    return str(exc.orig).startswith(SQLITE_UNDEFINED)


def service_code(exc: HttpResponseError) -> str:
    """The storage service's error code (`BlobNotFound`, ...), or `unknown`."""
    headers = getattr(exc.response, "headers", None) or {}
    code = headers.get("x-ms-error-code")
    if not code:
        raw = getattr(exc, "error_code", None)
        code = getattr(raw, "value", raw)
    return str(code or "unknown")


def error_kind(exc: BaseException) -> str:
    """What may be said of an error: its type and the driver's code, never its text."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return f"{type(exc).__name__}: {type(exc.orig).__name__}"
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return f"{type(exc).__name__} {exc.args[0].name()}"
    if isinstance(exc, HttpResponseError):
        return f"HTTP {exc.status_code or 0} {service_code(exc)}"
    return type(exc).__name__


def lethe_error(
    exc: BaseException,
    what: str,
    refused: type[LetheError] = DriverRefused,
    *,
    schema_changes: bool = False,
) -> LetheError | None:
    """The Lethe error for a driver's error from `what` (e.g. "Redis at host:port"), or None
    when `exc` is no driver's error. With `schema_changes`, a statement naming a table or
    column the database lacks is SchemaChanged."""
    kind = error_kind(exc)
    if schema_changes and undefined_name(exc):
        return SchemaChanged(
            f"{what} lacks a table or column the statement names: it changed after the step "
            f"read it ({kind})"
        )
    if isinstance(exc, HttpResponseError):
        status = exc.status_code or 0
        if (status >= 500 and status != 501) or status in (408, 429):
            return ServiceUnavailable(f"{what} did not answer ({kind})")
        return refused(f"{what} refused the request ({kind})")
    if isinstance(exc, _NOT_ANSWERING) or (
        isinstance(exc, AzureError) and not isinstance(exc, HttpResponseError)
    ):
        return ServiceUnavailable(f"{what} did not answer ({kind})")
    if isinstance(exc, SQLAlchemyError):
        return refused(f"{what} refused the statement ({kind})")
    return None


class translated:
    """`with translated(what)` / `async with translated(what)`: a driver's error raised inside
    becomes Lethe's (`lethe_error`), its text left behind; Lethe's own errors pass."""

    def __init__(
        self, what: str, refused: type[LetheError] = DriverRefused, *, schema_changes: bool = False
    ) -> None:
        self._what, self._refused, self._schema_changes = what, refused, schema_changes

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        if exc is None or isinstance(exc, LetheError) or not isinstance(exc, Exception):
            return False
        error = lethe_error(exc, self._what, self._refused, schema_changes=self._schema_changes)
        if error is None:
            return False
        raise error from None

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        return self.__exit__(exc_type, exc, tb)
