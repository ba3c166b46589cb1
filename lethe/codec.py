"""Lethe's Temporal data converter: pydantic payloads, AES-GCM encrypted under a key ring."""

from __future__ import annotations

import dataclasses
import os
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

from lethe.config import Settings
from lethe.errors import CodecError

ENCODING = b"binary/encrypted"
KEY_ID_METADATA = "encryption-key-id"
_NONCE_BYTES = 12


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
            nonce = os.urandom(_NONCE_BYTES)
            sealed = cipher.encrypt(nonce, payload.SerializeToString(), key_id)
            encoded.append(
                Payload(
                    metadata={"encoding": ENCODING, KEY_ID_METADATA: key_id},
                    data=nonce + sealed,
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
                raise CodecError(
                    f"payload was encrypted with codec key {key_id.decode(errors='replace')!r}, "
                    "which is not in LETHE_CODEC_KEYS"
                )
            nonce, sealed = payload.data[:_NONCE_BYTES], payload.data[_NONCE_BYTES:]
            try:
                plain = cipher.decrypt(nonce, sealed, key_id)
            except InvalidTag:
                raise CodecError(
                    "payload failed authentication: it was altered or its key id was changed"
                ) from None
            decoded.append(Payload.FromString(plain))
        return decoded


def codec_from_settings(settings: Settings) -> EncryptionCodec:
    """The payload codec for the key ring in the settings."""
    return EncryptionCodec(settings.key_ring, settings.current_codec_key_id)


def data_converter(codec: PayloadCodec) -> DataConverter:
    """Pydantic payloads, encrypted by `codec`, with failure messages and stacks encrypted too."""
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=codec,
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )
