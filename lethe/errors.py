"""Lethe's error types: each names the problem in words a DPO understands, with no personal data."""

from __future__ import annotations

from temporalio.exceptions import ApplicationError


def failure_reason(error: BaseException) -> str:
    """Why a Temporal call failed: the deepest ApplicationError's type and message (Lethe's
    errors carry no personal data), else the deepest cause's type name."""
    reason, deepest = "", error
    cause: BaseException | None = error
    while cause is not None:
        deepest = cause
        if isinstance(cause, ApplicationError):
            reason = f"{cause.type or 'error'}: {cause.message}"
        cause = cause.__cause__ or getattr(cause, "cause", None)
    return reason or type(deepest).__name__


class LetheError(Exception):
    """Base of every error Lethe raises on purpose."""

    retryable = False

    def to_application_error(self) -> ApplicationError:
        """The same error as Temporal sees it: typed by class name, non-retryable unless marked."""
        return ApplicationError(
            str(self), type=type(self).__name__, non_retryable=not self.retryable
        )


class ConfigurationError(LetheError):
    """A setting or an environment variable is missing or malformed."""


class UnknownRegion(LetheError):
    """A region name is malformed or not known to this deployment."""


class CodecError(LetheError):
    """A payload cannot be decrypted: unknown key id, or ciphertext that fails authentication."""


class ServiceUnavailable(LetheError):
    """A service Lethe depends on did not answer."""

    retryable = True
