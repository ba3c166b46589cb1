"""Lethe's error types: each names the problem in words a DPO understands, with no personal data."""

from __future__ import annotations

from temporalio.exceptions import ApplicationError


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
