"""Subject references: the keyed HMAC of (tenant, subject id), the only identity Lethe shows,
and the blob index-tag value that services put on per-subject backups."""

from __future__ import annotations

import hashlib
import hmac

REF_HEX_CHARS = 32


def subject_ref(tenant: str, subject_id: str, key: bytes) -> str:
    """HMAC-SHA256 of tenant and subject id under `key`, as 32 hex characters (128 bits)."""
    message = tenant.encode() + b"\x00" + subject_id.encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:REF_HEX_CHARS]


def tag_for(tenant: str, subject_id: str, key: bytes | None = None) -> str:
    """The index-tag value of a subject's per-subject blobs (exports, archives): their reference.

    A service uploading such a blob tags it `{subject_tag: tag_for(tenant, subject_id)}`, the
    tag name being the data map's `subject_tag`; the backup connector finds the subject's blobs
    by that tag and that value. `key` defaults to LETHE_SUBJECT_KEY, which must be the control
    plane's: another key makes a tag no erasure ever finds.
    """
    if key is None:
        from lethe.kernel.config import current_settings  # only here: the rest needs no settings

        key = current_settings().subject_key_bytes
    return subject_ref(tenant, subject_id, key)
