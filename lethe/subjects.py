"""Subject references: the keyed HMAC of (tenant, subject id), the only identity Lethe shows."""

from __future__ import annotations

import hashlib
import hmac

REF_HEX_CHARS = 32


def subject_ref(tenant: str, subject_id: str, key: bytes) -> str:
    """HMAC-SHA256 of tenant and subject id under `key`, as 32 hex characters (128 bits)."""
    message = tenant.encode() + b"\x00" + subject_id.encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:REF_HEX_CHARS]
