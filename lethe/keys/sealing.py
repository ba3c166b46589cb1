"""AES-GCM with a random 96-bit nonce in front: the one layout every Lethe-sealed value uses.

Wrapped data keys, KEK and codec-key material under the master key, forget-list entries and
codec payloads are all `nonce || ciphertext || tag`, bound to associated data that says what
and where the value is.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lethe.kernel.errors import ConfigurationError

NONCE_BYTES = 12


def seal(cipher: AESGCM, plain: bytes, aad: bytes) -> bytes:
    """`plain` encrypted under a fresh random nonce, bound to `aad`, the nonce in front."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + cipher.encrypt(nonce, plain, aad)


def unseal(cipher: AESGCM, sealed: bytes, aad: bytes) -> bytes:
    """The plaintext of a `seal`ed value; InvalidTag if it, or its `aad`, was changed."""
    return cipher.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)


class MasterKey:
    """The key service's master key (LETHE_KEYS_MASTER_KEY): it seals KEK and codec keys."""

    def __init__(self, key: bytes) -> None:
        self._cipher = AESGCM(key)

    def seal(self, material: bytes, aad: bytes) -> bytes:
        """Key material sealed for the key store, bound to `aad` (which key it is)."""
        return seal(self._cipher, material, aad)

    def open(self, sealed: bytes, aad: bytes, what: str) -> bytes:
        """Key material back; ConfigurationError naming `what` when this master key is not
        the one that sealed it."""
        try:
            return unseal(self._cipher, sealed, aad)
        except InvalidTag:
            raise ConfigurationError(
                f"{what} cannot be opened: LETHE_KEYS_MASTER_KEY is not the key it was sealed with"
            ) from None
