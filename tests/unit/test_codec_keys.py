"""The payload codec on the key service: rotation keeps old payloads readable, retiring ends it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.api.common.v1 import Payload

from lethe.codec.converter import KEY_ID_METADATA, KeyServiceCodec
from lethe.codec.keys import CodecKeyRing
from lethe.kernel.database import dispose_all
from lethe.kernel.errors import ConfigurationError, RotationConflict, UnknownCodecKey
from lethe.keys import store as key_store

MASTER = os.urandom(32)
PLAIN = Payload(metadata={"encoding": b"json/plain"}, data=b'{"note":"ada"}')


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    yield await key_store.key_engine(f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}")
    await dispose_all()


def key_id_of(payload: Payload) -> str:
    return payload.metadata[KEY_ID_METADATA].decode()


async def test_first_use_makes_a_key_and_rotation_keeps_old_payloads(engine: AsyncEngine) -> None:
    ring = CodecKeyRing(engine, MASTER)
    codec = KeyServiceCodec(ring, refresh_seconds=0)
    [old] = await codec.encode([PLAIN])
    first = key_id_of(old)
    second = await ring.rotate()
    [new] = await codec.encode([PLAIN])
    assert key_id_of(new) == second != first
    assert await codec.decode([old, new]) == [PLAIN, PLAIN]
    assert [(k.key_id, k.current) for k in await ring.list()] == [(first, False), (second, True)]


async def test_a_worker_meets_a_key_rotated_elsewhere(engine: AsyncEngine) -> None:
    worker = KeyServiceCodec(CodecKeyRing(engine, MASTER), refresh_seconds=3600)
    await worker.encode([PLAIN])  # loads the ring once
    elsewhere = KeyServiceCodec(CodecKeyRing(engine, MASTER), refresh_seconds=3600)
    await CodecKeyRing(engine, MASTER).rotate()
    [sealed] = await elsewhere.encode([PLAIN])
    assert await worker.decode([sealed]) == [PLAIN]


class CountingRing(CodecKeyRing):
    """The ring, counting its reads of the key store."""

    reads = 0

    async def load(self) -> tuple[dict[str, bytes], str]:
        self.reads += 1
        return await super().load()


async def test_a_stale_ring_is_read_once_however_many_payloads_wait(engine: AsyncEngine) -> None:
    ring = CountingRing(engine, MASTER)
    codec = KeyServiceCodec(ring, refresh_seconds=0)
    await codec.encode([PLAIN])
    await ring.rotate()
    before = ring.reads
    sealed = await asyncio.gather(*(codec.encode([PLAIN]) for _ in range(50)))
    assert ring.reads == before + 1
    # the calls that did not wait for the re-read went on with the key they had
    assert {key_id_of(payload) for [payload] in sealed} <= {k.key_id for k in await ring.list()}
    [newest] = await codec.encode([PLAIN])
    assert [key_id_of(newest)] == [k.key_id for k in await ring.list() if k.current]


async def test_a_first_use_by_many_at_once_reads_the_ring_once(engine: AsyncEngine) -> None:
    await CodecKeyRing(engine, MASTER).load()  # the ring's first key exists
    ring = CountingRing(engine, MASTER)
    codec = KeyServiceCodec(ring, refresh_seconds=3600)
    await asyncio.gather(*(codec.encode([PLAIN]) for _ in range(20)))
    assert ring.reads == 1


async def test_unknown_key_ids_at_once_share_one_fresh_read(engine: AsyncEngine) -> None:
    ring = CountingRing(engine, MASTER)
    worker = KeyServiceCodec(ring, refresh_seconds=3600)
    await worker.encode([PLAIN])
    await CodecKeyRing(engine, MASTER).rotate()
    [sealed] = await KeyServiceCodec(CodecKeyRing(engine, MASTER)).encode([PLAIN])
    before = ring.reads
    decoded = await asyncio.gather(*(worker.decode([sealed]) for _ in range(20)))
    assert decoded == [[PLAIN]] * 20
    # The first call's read; the calls that asked while it ran need one begun after them.
    assert ring.reads == before + 2


async def test_retiring_refuses_the_current_key_and_ends_the_old_one(engine: AsyncEngine) -> None:
    ring = CodecKeyRing(engine, MASTER)
    codec = KeyServiceCodec(ring, refresh_seconds=0)
    [old] = await codec.encode([PLAIN])
    current = await ring.rotate()
    with pytest.raises(RotationConflict, match="is the current one"):
        await ring.retire(current)
    with pytest.raises(ConfigurationError, match="no codec key 'nope'"):
        await ring.retire("nope")
    with pytest.raises(RotationConflict, match="superseded 0 s ago"):
        await ring.retire(key_id_of(old), settle_seconds=60)
    await ring.retire(key_id_of(old))
    with pytest.raises(UnknownCodecKey, match="not in the codec's key ring"):
        await codec.decode([old])
    retired = [k for k in await ring.list() if k.retired_at is not None]
    assert [k.key_id for k in retired] == [key_id_of(old)]


async def test_the_wrong_master_key_names_the_setting(engine: AsyncEngine) -> None:
    await CodecKeyRing(engine, MASTER).load()
    with pytest.raises(ConfigurationError, match="LETHE_KEYS_MASTER_KEY"):
        await CodecKeyRing(engine, os.urandom(32)).load()
