"""The self-describing ciphertext of `lethe.keys.service`: a header naming the key, then AES-GCM.

Layout (big-endian), 35 bytes of header before the sealed value:

    magic "LK" | format version (1 byte) | subject reference (16 bytes) | DEK version (4 bytes)
    | nonce (12 bytes) | AES-GCM ciphertext and 16-byte tag

The whole header and the caller's associated data are authenticated, so a flipped bit in the
header, the body or the associated data fails decryption, and a value cannot be moved to another
subject, key version or place (system, table, column) without detection.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from lethe.kernel.errors import MalformedCiphertext
from lethe.kernel.subjects import REF_HEX_CHARS
from lethe.keys.sealing import NONCE_BYTES

MAGIC = b"LK"
FORMAT_VERSION = 1
TAG_BYTES = 16
_REF_BYTES = REF_HEX_CHARS // 2
_HEADER = struct.Struct(f">2sB{_REF_BYTES}sI{NONCE_BYTES}s")
HEADER_BYTES = _HEADER.size


@dataclass(frozen=True, slots=True)
class Header:
    """What a ciphertext says about itself: whose data key, which version, which nonce."""

    subject_ref: str
    dek_version: int
    nonce: bytes

    def pack(self) -> bytes:
        """The header's bytes, as written in front of the sealed value."""
        return _HEADER.pack(
            MAGIC, FORMAT_VERSION, bytes.fromhex(self.subject_ref), self.dek_version, self.nonce
        )


def associated_data(header: bytes, aad: bytes) -> bytes:
    """What AES-GCM authenticates beside the value: the header, then the caller's data."""
    return header + aad


def parse(value: bytes) -> tuple[Header, bytes, bytes]:
    """Split a ciphertext into its header, the header's bytes and the sealed body."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise MalformedCiphertext(f"a ciphertext is bytes, not {type(value).__name__}")
    value = bytes(value)
    if len(value) < HEADER_BYTES + TAG_BYTES:
        raise MalformedCiphertext(
            f"ciphertext is truncated: {len(value)} bytes, shorter than the "
            f"{HEADER_BYTES}-byte header and {TAG_BYTES}-byte tag"
        )
    magic, version, ref, dek_version, nonce = _HEADER.unpack_from(value)
    if magic != MAGIC:
        raise MalformedCiphertext("not a Lethe ciphertext: it does not start with 'LK'")
    if version != FORMAT_VERSION:
        raise MalformedCiphertext(
            f"ciphertext format version {version} is not known (this Lethe reads {FORMAT_VERSION})"
        )
    if dek_version < 1:
        raise MalformedCiphertext("ciphertext names data-key version 0, which never exists")
    header = Header(subject_ref=ref.hex(), dek_version=dek_version, nonce=nonce)
    return header, value[:HEADER_BYTES], value[HEADER_BYTES:]
