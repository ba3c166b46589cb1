"""The payload codec: round trips, key rotation, and tampering rejected with a clear error."""

from __future__ import annotations

import os

import pytest
from temporalio.api.common.v1 import Payload

from lethe.codec.converter import ENCODING, KEY_ID_METADATA, EncryptionCodec
from lethe.kernel.errors import CodecError

OLD, NEW = os.urandom(32), os.urandom(32)
PLAIN = Payload(metadata={"encoding": b"json/plain"}, data=b'{"email":"ada@example.org"}')


async def test_round_trip_hides_data_and_metadata() -> None:
    codec = EncryptionCodec({"k1": OLD}, "k1")
    [sealed] = await codec.encode([PLAIN])
    assert sealed.metadata["encoding"] == ENCODING
    assert sealed.metadata[KEY_ID_METADATA] == b"k1"
    assert b"ada@example.org" not in sealed.data
    assert b"json/plain" not in sealed.data
    assert await codec.decode([sealed]) == [PLAIN]


async def test_each_encryption_uses_a_fresh_nonce() -> None:
    codec = EncryptionCodec({"k1": OLD}, "k1")
    first, second = await codec.encode([PLAIN, PLAIN])
    assert first.data != second.data


async def test_rotation_keeps_old_payloads_readable() -> None:
    [old_sealed] = await EncryptionCodec({"k1": OLD}, "k1").encode([PLAIN])
    rotated = EncryptionCodec({"k2": NEW, "k1": OLD}, "k2")
    [new_sealed] = await rotated.encode([PLAIN])
    assert new_sealed.metadata[KEY_ID_METADATA] == b"k2"
    assert await rotated.decode([old_sealed, new_sealed]) == [PLAIN, PLAIN]


async def test_a_retired_key_is_named_in_the_error() -> None:
    [sealed] = await EncryptionCodec({"k1": OLD}, "k1").encode([PLAIN])
    with pytest.raises(CodecError, match="'k1', which is not in the codec's key ring"):
        await EncryptionCodec({"k2": NEW}, "k2").decode([sealed])


@pytest.mark.parametrize("position", [0, 5, 12, -1])
async def test_a_flipped_bit_is_rejected(position: int) -> None:
    codec = EncryptionCodec({"k1": OLD}, "k1")
    [sealed] = await codec.encode([PLAIN])
    data = bytearray(sealed.data)
    data[position] ^= 0x01
    tampered = Payload(metadata=dict(sealed.metadata), data=bytes(data))
    with pytest.raises(CodecError, match="failed authentication"):
        await codec.decode([tampered])


async def test_relabelling_the_key_id_is_rejected() -> None:
    codec = EncryptionCodec({"k1": OLD, "k2": OLD}, "k1")
    [sealed] = await codec.encode([PLAIN])
    relabelled = Payload(metadata={**sealed.metadata, KEY_ID_METADATA: b"k2"}, data=sealed.data)
    with pytest.raises(CodecError, match="failed authentication"):
        await codec.decode([relabelled])


async def test_unencrypted_payloads_pass_through_decode() -> None:
    codec = EncryptionCodec({"k1": OLD}, "k1")
    assert await codec.decode([PLAIN]) == [PLAIN]


def test_current_key_must_be_in_the_ring() -> None:
    with pytest.raises(CodecError, match="'k9' is not in the key ring"):
        EncryptionCodec({"k1": OLD}, "k9")
