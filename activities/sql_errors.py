"""Database driver errors as Lethe's: by type only, since a driver's text can quote parameters."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout

from lethe.kernel.errors import LetheError, ServiceUnavailable


@asynccontextmanager
async def translated(what: str, refused: type[LetheError]) -> AsyncIterator[None]:
    """Raise ServiceUnavailable (retryable) when `what` does not answer, `refused` when it
    rejects a statement; the message names `what` and the error's type, never its text."""
    try:
        yield
    except (OperationalError, InterfaceError, DisconnectionError, PoolTimeout) as exc:
        raise ServiceUnavailable(f"{what} did not answer ({error_kind(exc)})") from None
    except (OSError, TimeoutError) as exc:
        raise ServiceUnavailable(f"{what} did not answer ({type(exc).__name__})") from None
    except SQLAlchemyError as exc:
        raise refused(f"{what} refused the statement ({error_kind(exc)})") from None


def error_kind(exc: SQLAlchemyError) -> str:
    """The error's type, and the driver's own type beneath it."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return f"{type(exc).__name__}: {type(exc.orig).__name__}"
    return type(exc).__name__
