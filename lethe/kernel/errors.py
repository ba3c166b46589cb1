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


class UnknownCodecKey(CodecError):
    """A payload names a codec key the ring does not hold (retired, or another key store's)."""


class ServiceUnavailable(LetheError):
    """A service Lethe depends on did not answer."""

    retryable = True


class KeyServiceError(LetheError):
    """Base of the key service's errors: none of them carries key material or plaintext."""


class MalformedCiphertext(KeyServiceError):
    """A value is not a Lethe ciphertext: too short, wrong magic, or an unknown format version."""


class CiphertextRejected(KeyServiceError):
    """A ciphertext failed authentication: altered, truncated, or bound to other data."""


class UnknownDataKey(KeyServiceError):
    """No data key exists for the subject and version a ciphertext names."""


class KeyShredded(KeyServiceError):
    """The subject's data keys were destroyed by an erasure; its data is unreadable for good."""


class KeyRetired(KeyServiceError):
    """A key-encryption-key version is below the minimum decryption version, or destroyed."""


class RotationConflict(KeyServiceError):
    """A key-management step would lose keys: e.g. retiring a version that still wraps some."""
