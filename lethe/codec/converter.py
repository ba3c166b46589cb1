"""Lethe's Temporal data converter: pydantic payloads, AES-GCM encrypted under a key ring.

The ring is the key service's (`lethe.codec.keys`); `EncryptionCodec` works on any ring given.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import (
    DataConverter,
    DefaultFailureConverterWithEncodedAttributes,
    PayloadCodec,
)

from lethe.codec.keys import CodecKeyRing
from lethe.kernel.config import Settings
from lethe.kernel.errors import CodecError, UnknownCodecKey
from lethe.keys.sealing import seal, unseal
from lethe.keys.store import key_engine

ENCODING = b"binary/encrypted"
KEY_ID_METADATA = "encryption-key-id"


class EncryptionCodec(PayloadCodec):
    """Encrypts with the current key; decrypts with whichever key of the ring a payload names.

    The key id travels in the payload's metadata and is bound to the ciphertext as associated
    data, so a payload relabelled with another key id fails authentication.
    """

    def __init__(self, keys: Mapping[str, bytes], current_key_id: str) -> None:
        if current_key_id not in keys:
            raise CodecError(f"codec key {current_key_id!r} is not in the key ring")
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self._current_key_id = current_key_id

    @property
    def current_key_id(self) -> str:
        """The id of the key that encrypts new payloads."""
        return self._current_key_id

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Encrypt each payload, whole (metadata included), under the current key."""
        key_id = self._current_key_id.encode()
        cipher = self._ciphers[self._current_key_id]
        encoded = []
        for payload in payloads:
            encoded.append(
                Payload(
                    metadata={"encoding": ENCODING, KEY_ID_METADATA: key_id},
                    data=seal(cipher, payload.SerializeToString(), key_id),
                )
            )
        return encoded

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Decrypt payloads this codec encrypted; pass others (never encrypted) through."""
        decoded = []
        for payload in payloads:
            if payload.metadata.get("encoding") != ENCODING:
                decoded.append(payload)
                continue
            key_id = payload.metadata.get(KEY_ID_METADATA, b"")
            cipher = self._ciphers.get(key_id.decode(errors="replace"))
            if cipher is None:
                raise UnknownCodecKey(
                    f"payload was encrypted with codec key {key_id.decode(errors='replace')!r}, "
                    "which is not in the codec's key ring (retired, or from another key store)"
                )
            try:
                plain = unseal(cipher, payload.data, key_id)
            except InvalidTag:
                raise CodecError(
                    "payload failed authentication: it was altered or its key id was changed"
                ) from None
            decoded.append(Payload.FromString(plain))
        return decoded


class KeyServiceCodec(PayloadCodec):
    """The codec on the key service's ring: new payloads under its current key, every other
    live key for decryption; the ring is re-read as keys rotate."""

    def __init__(self, ring: CodecKeyRing, refresh_seconds: float = 60.0) -> None:
        self._ring = ring
        self._refresh_seconds = refresh_seconds
        self._codec: EncryptionCodec | None = None
        self._loaded_at = 0.0
        self._reads_begun = 0
        self._reading = asyncio.Lock()

    async def codec(self, *, fresh: bool = False) -> EncryptionCodec:
        """The codec for the ring as it is now.

        Past the refresh time one call re-reads the ring while the others go on with the view
        they have; `fresh` waits for a read begun after the call (a key id not seen yet).
        """
        codec = self._codec
        if codec is not None and not fresh and (not self._stale() or self._reading.locked()):
            return codec
        asked = self._reads_begun
        async with self._reading:
            # A read that ended while this call waited serves it, unless the call must be fresh
            # and that read began before the call did.
            served = self._reads_begun > asked if fresh else not self._stale()
            if self._codec is None or not served:
                self._reads_begun += 1
                keys, current = await self._ring.load()
                self._codec = EncryptionCodec(keys, current)
                self._loaded_at = time.monotonic()
            return self._codec

    def _stale(self) -> bool:
        return time.monotonic() - self._loaded_at > self._refresh_seconds

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Encrypt under the current codec key."""
        return await (await self.codec()).encode(payloads)

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Decrypt; a key id this process has not seen yet re-reads the ring once."""
        try:
            return await (await self.codec()).decode(payloads)
        except UnknownCodecKey:
            return await (await self.codec(fresh=True)).decode(payloads)


async def codec_from_settings(settings: Settings) -> KeyServiceCodec:
    """The payload codec on the key service the settings name (read once, to fail early)."""
    engine = await key_engine(settings.key_store_url)
    codec = KeyServiceCodec(
        CodecKeyRing(engine, settings.keys_master_key_bytes), settings.keys_cache_seconds
    )
    await codec.codec()
    return codec


def data_converter(codec: PayloadCodec) -> DataConverter:
    """Pydantic payloads, encrypted by `codec`, with failure messages and stacks encrypted too."""
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=codec,
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )
