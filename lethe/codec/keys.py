"""The payload codec's keys, kept by the key service: rotate, list, and retire when unused.

Each codec key is sealed under the key service's master key in the key store. The newest key
encrypts new payloads; every key not yet retired still decrypts, so rotating never makes an
old history unreadable. A key is retired (its material destroyed) only once no open workflow's
history holds a payload encrypted with it (`lethe.temporal.codec_usage`), since a worker
replaying that history would need it.
"""

from __future__ import annotations

import os
import secrets
from datetime import UTC, datetime

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from lethe.contracts import Contract
from lethe.kernel.errors import ConfigurationError, RotationConflict
from lethe.keys.sealing import MasterKey
from lethe.keys.store import codec_keys

CODEC_KEY_BYTES = 32


class CodecKeyInfo(Contract):
    """One codec key as listings show it (never its material)."""

    key_id: str
    current: bool
    created_at: datetime
    retired_at: datetime | None = None


class CodecKeyRing:
    """The codec keys in the key store, sealed under the master key."""

    def __init__(self, engine: AsyncEngine, master_key: bytes) -> None:
        self._engine = engine
        self._master = MasterKey(master_key)

    async def load(self) -> tuple[dict[str, bytes], str]:
        """Every usable key by id, and the id of the newest (made on first use)."""
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(codec_keys.c.key_id, codec_keys.c.material)
                    .where(codec_keys.c.retired_at.is_(None))
                    .order_by(codec_keys.c.created_at, codec_keys.c.key_id)
                )
            ).all()
        if not rows:
            await self.rotate()
            return await self.load()
        ring = {
            row.key_id: self._master.open(
                row.material, _aad(row.key_id), f"codec key {row.key_id!r}"
            )
            for row in rows
        }
        return ring, rows[-1].key_id

    async def rotate(self) -> str:
        """A new codec key, which encrypts every payload from now on; its id."""
        now = datetime.now(UTC)
        key_id = f"c{now:%Y%m%d%H%M%S}-{secrets.token_hex(3)}"
        material = os.urandom(CODEC_KEY_BYTES)
        sealed = self._master.seal(material, _aad(key_id))
        try:
            async with self._engine.begin() as conn:
                await conn.execute(
                    insert(codec_keys).values(key_id=key_id, material=sealed, created_at=now)
                )
        except IntegrityError:
            return await self.rotate()  # the same second and random suffix: draw again
        return key_id

    async def list(self) -> list[CodecKeyInfo]:
        """Every codec key, oldest first, retired ones included."""
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(
                        codec_keys.c.key_id, codec_keys.c.created_at, codec_keys.c.retired_at
                    ).order_by(codec_keys.c.created_at, codec_keys.c.key_id)
                )
            ).all()
        live = [row.key_id for row in rows if row.retired_at is None]
        newest = live[-1] if live else None
        return [
            CodecKeyInfo(
                key_id=row.key_id,
                current=row.key_id == newest,
                created_at=row.created_at,
                retired_at=row.retired_at,
            )
            for row in rows
        ]

    async def retire(self, key_id: str, settle_seconds: float = 0.0) -> None:
        """Destroy a codec key that is not the current one (callers check open workflows).

        A key superseded less than `settle_seconds` ago is refused: processes that have not
        re-read the ring yet may still be encrypting with it.
        """
        infos = await self.list()
        index = next((n for n, info in enumerate(infos) if info.key_id == key_id), None)
        if index is None:
            raise ConfigurationError(f"there is no codec key {key_id!r} in the key store")
        if infos[index].current:
            raise RotationConflict(
                f"codec key {key_id!r} is the current one: rotate first (lethe codec rotate)"
            )
        superseded = infos[index + 1].created_at
        if superseded.tzinfo is None:  # SQLite returns naive UTC
            superseded = superseded.replace(tzinfo=UTC)
        age = (datetime.now(UTC) - superseded).total_seconds()
        if age < settle_seconds:
            raise RotationConflict(
                f"codec key {key_id!r} was superseded {age:.0f} s ago; workers may still encrypt "
                f"with it until they re-read the ring: retire it after {settle_seconds:.0f} s"
            )
        async with self._engine.begin() as conn:
            await conn.execute(
                update(codec_keys)
                .where(codec_keys.c.key_id == key_id, codec_keys.c.retired_at.is_(None))
                .values(material=None, retired_at=datetime.now(UTC))
            )


def _aad(key_id: str) -> bytes:
    return b"lethe codec key " + key_id.encode()
