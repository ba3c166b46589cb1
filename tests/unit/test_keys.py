"""The key service on a SQLite key store: round trips, tampering, version caps, shredding, KEKs."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import delete, insert, select

from lethe.contracts import Subject
from lethe.kernel.database import dispose_all
from lethe.kernel.errors import (
    CiphertextRejected,
    ConfigurationError,
    KeyRetired,
    KeyShredded,
    MalformedCiphertext,
    RotationConflict,
    UnknownDataKey,
)
from lethe.keys import ciphertext
from lethe.keys import store as key_store
from lethe.keys.kek import LocalKekProvider
from lethe.keys.service import KeyService, place

ADA = Subject(tenant="clinic", subject_id="ada")
BOB = Subject(tenant="clinic", subject_id="bob")
WHERE = place("kafka", "patient-events", "email")
MASTER, SUBJECT_KEY = os.urandom(32), os.urandom(32)


def service_on(engine: object, *, master: bytes = MASTER, cap: int = 2**32) -> KeyService:
    """A fresh key service (empty caches) on the same key store."""
    provider = LocalKekProvider(engine, master, cache_seconds=0)  # type: ignore[arg-type]
    return KeyService(
        engine,  # type: ignore[arg-type]
        provider,
        SUBJECT_KEY,
        max_encryptions=cap,
        cache_seconds=60,
    )


@pytest.fixture
async def keys(tmp_path: Path) -> AsyncIterator[KeyService]:
    engine = await key_store.key_engine(f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}")
    yield service_on(engine)
    await dispose_all()


async def test_round_trip_and_fresh_nonces(keys: KeyService) -> None:
    first = await keys.encrypt(ADA, b"ada@example.org", WHERE)
    second = await keys.encrypt(ADA, b"ada@example.org", WHERE)
    assert first != second
    assert b"ada@example.org" not in first
    header, _, _ = ciphertext.parse(first)
    assert header.subject_ref == keys.subject_ref("clinic", "ada")
    assert header.dek_version == 1
    assert await keys.decrypt(first, WHERE) == b"ada@example.org"
    assert await service_on(keys.engine).decrypt(second, WHERE) == b"ada@example.org"


async def test_each_subject_has_its_own_key(keys: KeyService) -> None:
    sealed = await keys.encrypt(BOB, b"bob", WHERE)
    forged = bytearray(sealed)
    forged[3:19] = bytes.fromhex(keys.subject_ref("clinic", "ada"))
    await keys.encrypt(ADA, b"ada", WHERE)  # Ada has a key too, just another one
    with pytest.raises(CiphertextRejected):
        await keys.decrypt(bytes(forged), WHERE)


@pytest.mark.parametrize("position", [2, 3, 18, 19, 22, 23, 34, 35, -1])
async def test_a_flipped_bit_anywhere_is_rejected(keys: KeyService, position: int) -> None:
    sealed = bytearray(await keys.encrypt(ADA, b"ada@example.org", WHERE))
    sealed[position] ^= 0x01
    with pytest.raises((CiphertextRejected, MalformedCiphertext, UnknownDataKey)):
        await keys.decrypt(bytes(sealed), WHERE)


async def test_other_associated_data_is_rejected(keys: KeyService) -> None:
    sealed = await keys.encrypt(ADA, b"ada@example.org", WHERE)
    with pytest.raises(CiphertextRejected, match="associated data"):
        await keys.decrypt(sealed, place("kafka", "patient-events", "name"))


async def test_truncated_and_foreign_values_are_named(keys: KeyService) -> None:
    sealed = await keys.encrypt(ADA, b"x", WHERE)
    with pytest.raises(MalformedCiphertext, match="truncated"):
        await keys.decrypt(sealed[:30], WHERE)
    with pytest.raises(CiphertextRejected):
        await keys.decrypt(sealed[:-1], WHERE)
    with pytest.raises(MalformedCiphertext, match="'LK'"):
        await keys.decrypt(b"XX" + sealed[2:], WHERE)
    with pytest.raises(MalformedCiphertext, match="format version 9"):
        await keys.decrypt(sealed[:2] + b"\x09" + sealed[3:], WHERE)


async def test_a_subject_without_keys_is_unknown(keys: KeyService) -> None:
    header = ciphertext.Header("ab" * 16, 1, os.urandom(12)).pack()
    with pytest.raises(UnknownDataKey, match="no data key version 1"):
        await keys.decrypt(header + os.urandom(20), WHERE)


async def test_the_encryption_cap_rolls_a_new_version(keys: KeyService) -> None:
    capped = service_on(keys.engine, cap=3)
    sealed = [await capped.encrypt(ADA, b"%d" % n, WHERE) for n in range(7)]
    versions = [ciphertext.parse(value)[0].dek_version for value in sealed]
    assert versions == [1, 1, 1, 2, 2, 2, 3]
    reader = service_on(keys.engine, cap=3)
    assert [await reader.decrypt(value, WHERE) for value in sealed] == [b"%d" % n for n in range(7)]


async def test_shredding_makes_every_copy_unreadable(keys: KeyService) -> None:
    ada = await keys.encrypt(ADA, b"ada@example.org", WHERE)
    bob = await keys.encrypt(BOB, b"bob@example.org", WHERE)
    other_process = service_on(keys.engine)
    assert await other_process.decrypt(ada, WHERE) == b"ada@example.org"
    ref = keys.subject_ref("clinic", "ada")
    assert await keys.shred(ref, "clinic", "req-1") == 1
    with pytest.raises(KeyShredded, match="crypto-shredded"):
        await keys.decrypt(ada, WHERE)
    with pytest.raises(KeyShredded):
        await other_process.decrypt(ada, WHERE, cached=False)
    with pytest.raises(KeyShredded, match="does not make new keys"):
        await keys.encrypt(ADA, b"again", WHERE)
    assert await keys.decrypt(bob, WHERE) == b"bob@example.org"
    assert await keys.shred(ref, "clinic", "req-1") == 0


async def test_rotation_rewraps_then_retires_the_old_kek(keys: KeyService) -> None:
    subjects = [Subject(tenant="clinic", subject_id=f"p{n}") for n in range(25)]
    sealed = [await keys.encrypt(s, s.subject_id.encode(), WHERE) for s in subjects]
    provider = keys.provider
    assert await provider.current_version() == 1
    target = await provider.create_version(rotation_id="r1")
    assert await provider.create_version(rotation_id="r1") == target == 2
    with pytest.raises(RotationConflict, match="25 data key"):
        await provider.raise_min_decrypt_version(target)
    with pytest.raises(RotationConflict, match="minimum decryption version is 1"):
        await provider.retire(1)

    after, rewrapped = None, 0
    while True:
        batch = await keys.rewrap_batch(target, after, 10)
        rewrapped += batch.rewrapped
        if batch.last is None:
            break
        after = batch.last
    assert rewrapped == 25
    assert (await keys.rewrap_batch(target, None, 10)).rewrapped == 0
    await provider.raise_min_decrypt_version(target)
    await provider.retire(1)

    status = await keys.status()
    assert [(v.version, v.state) for v in status.versions] == [(1, "retired"), (2, "current")]
    assert status.data_keys_by_kek == {2: 25}
    fresh = service_on(keys.engine)
    assert [await fresh.decrypt(v, WHERE) for v in sealed] == [
        s.subject_id.encode() for s in subjects
    ]


async def test_a_retired_kek_cannot_unwrap(keys: KeyService) -> None:
    sealed = await keys.encrypt(ADA, b"ada", WHERE)
    provider = keys.provider
    await provider.create_version()
    async with keys.engine.begin() as conn:  # a row restored from before the rotation
        row = (await conn.execute(select(key_store.data_keys))).one()._asdict()
    await keys.rewrap_batch(2, None, 100)
    await provider.raise_min_decrypt_version(2)
    await provider.retire(1)
    async with keys.engine.begin() as conn:
        await conn.execute(delete(key_store.data_keys))
        await conn.execute(insert(key_store.data_keys).values(**row))
    with pytest.raises(KeyRetired, match="below the minimum decryption version 2"):
        await service_on(keys.engine).decrypt(sealed, WHERE, cached=False)


async def test_the_wrong_master_key_is_a_configuration_error(keys: KeyService) -> None:
    sealed = await keys.encrypt(ADA, b"ada", WHERE)
    with pytest.raises(ConfigurationError, match="LETHE_KEYS_MASTER_KEY"):
        await service_on(keys.engine, master=os.urandom(32)).decrypt(sealed, WHERE)


def test_a_place_refuses_empty_or_ambiguous_parts() -> None:
    with pytest.raises(ValueError, match="at least one part"):
        place()
    with pytest.raises(ValueError, match="non-empty"):
        place("sql", "")
    assert place("sql", "patients", "email") != place("sql", "patients.email")


async def test_no_key_is_made_for_a_shredded_subject(keys: KeyService) -> None:
    ref = keys.subject_ref("clinic", "ada")
    await keys.shred(ref, "clinic", "req-1")
    row = key_store.DataKeyRow(ref, 1, "clinic", 1, b"w" * 60, encryptions=0)
    assert await key_store.add_key(keys.engine, row) == "shredded"
    assert await key_store.latest_key(keys.engine, ref) is None


async def test_close_forgets_keys_and_connections(keys: KeyService) -> None:
    sealed = await keys.encrypt(ADA, b"ada", WHERE)
    url = keys.engine.url.render_as_string(hide_password=False)
    await keys.close()
    reopened = service_on(await key_store.key_engine(url))
    assert await reopened.decrypt(sealed, WHERE) == b"ada"


async def test_a_stale_view_of_the_keks_never_wraps_below_the_minimum(keys: KeyService) -> None:
    await keys.encrypt(ADA, b"ada", WHERE)
    stale = KeyService(
        keys.engine, LocalKekProvider(keys.engine, MASTER, cache_seconds=3600), SUBJECT_KEY
    )
    assert await stale.provider.current_version() == 1  # cached from here on
    target = await keys.provider.create_version()
    await keys.rewrap_batch(target, None, 100)
    await keys.provider.raise_min_decrypt_version(target)
    sealed = await stale.encrypt(BOB, b"bob", WHERE)  # a new key, made by the stale process
    bob = await key_store.latest_key(keys.engine, keys.subject_ref("clinic", "bob"))
    assert bob is not None and bob.kek_version == target
    assert await service_on(keys.engine).decrypt(sealed, WHERE) == b"bob"


async def test_the_minimum_is_not_raised_while_an_old_key_remains(keys: KeyService) -> None:
    await keys.encrypt(ADA, b"ada", WHERE)
    target = await keys.provider.create_version()
    with pytest.raises(RotationConflict, match="1 data key"):
        await keys.provider.raise_min_decrypt_version(target)
    assert await service_on(keys.engine).provider.min_decrypt_version() == 1
