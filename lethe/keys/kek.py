"""Key-encryption keys (KEKs): versions behind a provider interface, and the local provider.

A provider wraps and unwraps data keys under a numbered KEK version and manages the versions'
life: create a version (it becomes current), raise the minimum version allowed to decrypt,
retire a version (destroy it). The local provider keeps each version's material in the key
store, sealed under the master key from LETHE_KEYS_MASTER_KEY. Azure Key Vault or Vault's
transit engine fit the same interface (their key versions, `min_decryption_version`, and
wrap/unwrap operations), so callers do not change when one is added.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from typing import Literal, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from lethe.contracts import Contract
from lethe.kernel.errors import CiphertextRejected, ConfigurationError, KeyRetired, RotationConflict
from lethe.keys.sealing import MasterKey, seal, unseal
from lethe.keys.store import count_below, kek_state, kek_versions

KEK_BYTES = 32
INITIAL_ROTATION = "initial"

KekState = Literal["current", "active", "disabled", "retired"]


class KekVersion(Contract):
    """One KEK version and where it is in its life.

    `current` wraps new data keys; `active` still decrypts; `disabled` is below the minimum
    decryption version but not yet destroyed (the grace period); `retired` is destroyed.
    """

    version: int
    state: KekState
    created_at: datetime
    retired_at: datetime | None = None


class KekProvider(Protocol):
    """What the key service needs from wherever the KEKs live."""

    async def current_version(self, *, fresh: bool = False) -> int:
        """The version that wraps new data keys (the first use creates version 1); `fresh`
        skips any cache."""
        ...

    async def min_decrypt_version(self) -> int:
        """The oldest version still allowed to unwrap."""
        ...

    async def versions(self) -> list[KekVersion]:
        """Every version, oldest first."""
        ...

    async def create_version(self, rotation_id: str | None = None) -> int:
        """A new current version; the same rotation id always yields the same version."""
        ...

    async def wrap(self, version: int, key: bytes, aad: bytes) -> bytes:
        """`key` sealed under KEK `version`, bound to `aad`."""
        ...

    async def unwrap(self, version: int, wrapped: bytes, aad: bytes) -> bytes:
        """The key back; KeyRetired below the minimum decryption version or once destroyed."""
        ...

    async def raise_min_decrypt_version(self, version: int) -> None:
        """Stop every older version from unwrapping; refused while one still wraps a key."""
        ...

    async def retire(self, version: int) -> None:
        """Destroy a version below the minimum decryption version (idempotent)."""
        ...


class LocalKekProvider:
    """KEKs in the key store, each sealed under a master key held only in the settings."""

    def __init__(self, engine: AsyncEngine, master_key: bytes, cache_seconds: float = 60.0):
        if len(master_key) != KEK_BYTES:
            raise ConfigurationError(f"the KEK master key must be {KEK_BYTES} bytes")
        self._engine = engine
        self._master = MasterKey(master_key)
        self._cache_seconds = cache_seconds
        self._keks: dict[int, AESGCM] = {}
        self._state: tuple[float, int, int] | None = None  # (read at, current, min decrypt)

    async def current_version(self, *, fresh: bool = False) -> int:
        """The version that wraps new data keys."""
        return (await self._read_state(fresh=fresh))[0]

    async def min_decrypt_version(self) -> int:
        """The oldest version still allowed to unwrap."""
        return (await self._read_state())[1]

    async def versions(self) -> list[KekVersion]:
        """Every version, oldest first, with its state."""
        current, minimum = await self._read_state(fresh=True)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(kek_versions).order_by("version"))).all()
        found = []
        for row in rows:
            state: KekState
            if row.retired_at is not None:
                state = "retired"
            elif row.version < minimum:
                state = "disabled"
            elif row.version == current:
                state = "current"
            else:
                state = "active"
            found.append(
                KekVersion(
                    version=row.version,
                    state=state,
                    created_at=row.created_at,
                    retired_at=row.retired_at,
                )
            )
        return found

    async def create_version(self, rotation_id: str | None = None) -> int:
        """A new current version; a repeated rotation id returns the version it made."""
        while True:
            async with self._engine.begin() as conn:
                if rotation_id is not None:
                    made = await conn.execute(
                        select(kek_versions.c.version).where(
                            kek_versions.c.rotation_id == rotation_id
                        )
                    )
                    version = made.scalar_one_or_none()
                    if version is not None:
                        return int(version)
                newest = await conn.execute(select(func.max(kek_versions.c.version)))
                version = (newest.scalar_one_or_none() or 0) + 1
            material = os.urandom(KEK_BYTES)
            try:
                async with self._engine.begin() as conn:
                    await conn.execute(
                        insert(kek_versions).values(
                            version=version,
                            material=self._master.seal(material, _kek_aad(version)),
                            created_at=datetime.now(UTC),
                            rotation_id=rotation_id,
                        )
                    )
                    if version == 1:
                        await conn.execute(insert(kek_state).values(id=1, min_decrypt_version=1))
            except IntegrityError:
                continue  # another writer took this version number (or this rotation id)
            self._keks[version] = AESGCM(material)
            self._state = None
            return version

    async def wrap(self, version: int, key: bytes, aad: bytes) -> bytes:
        """`key` sealed under KEK `version`, bound to `aad`."""
        return seal(await self._kek(version), key, aad)

    async def unwrap(self, version: int, wrapped: bytes, aad: bytes) -> bytes:
        """The key back from its wrapping under KEK `version`."""
        minimum = await self.min_decrypt_version()
        if version < minimum:
            raise KeyRetired(
                f"KEK version {version} is below the minimum decryption version {minimum}"
            )
        try:
            return unseal(await self._kek(version), wrapped, aad)
        except InvalidTag:
            raise CiphertextRejected(
                f"a data key wrapped by KEK version {version} failed authentication: the key "
                "store row was altered or moved"
            ) from None

    async def raise_min_decrypt_version(self, version: int) -> None:
        """Stop every version older than `version` from unwrapping."""
        # Fresh: another process may have made `version` within this one's cache time.
        current = (await self._read_state(fresh=True))[0]
        if version > current:
            raise RotationConflict(
                f"cannot raise the minimum decryption version to {version}: the newest KEK "
                f"version is {current}"
            )
        # Raise first, then count, in one transaction: the update locks the state row, so a
        # data key being added under an older version either commits before (and is counted,
        # which undoes the raise) or sees the new minimum and is refused (key_store.add_key).
        async with self._engine.begin() as conn:
            await conn.execute(
                update(kek_state)
                .where(kek_state.c.id == 1, kek_state.c.min_decrypt_version < version)
                .values(min_decrypt_version=version)
            )
            left = await count_below(conn, version)
            if left:
                raise RotationConflict(
                    f"{left} data key(s) are still wrapped by a KEK older than version "
                    f"{version}; rewrap them first (lethe keys rotate)"
                )
        self._state = None

    async def retire(self, version: int) -> None:
        """Destroy KEK `version`; it must be below the minimum decryption version."""
        minimum = (await self._read_state(fresh=True))[1]
        if version >= minimum:
            raise RotationConflict(
                f"KEK version {version} cannot be retired: the minimum decryption version is "
                f"{minimum}, so it may still unwrap keys"
            )
        async with self._engine.begin() as conn:
            await conn.execute(
                update(kek_versions)
                .where(kek_versions.c.version == version, kek_versions.c.retired_at.is_(None))
                .values(material=None, retired_at=datetime.now(UTC))
            )
        self._keks.pop(version, None)

    async def _read_state(self, *, fresh: bool = False) -> tuple[int, int]:
        now = time.monotonic()
        if fresh or self._state is None or now - self._state[0] > self._cache_seconds:
            async with self._engine.connect() as conn:
                current = (
                    await conn.execute(select(func.max(kek_versions.c.version)))
                ).scalar_one_or_none()
                minimum = (
                    await conn.execute(select(kek_state.c.min_decrypt_version))
                ).scalar_one_or_none()
            if current is None or minimum is None:
                await self.create_version(rotation_id=INITIAL_ROTATION)
                return await self._read_state(fresh=True)
            self._state = (now, int(current), int(minimum))
        return self._state[1], self._state[2]

    async def _kek(self, version: int) -> AESGCM:
        kek = self._keks.get(version)
        if kek is not None:
            return kek
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(kek_versions.c.material, kek_versions.c.retired_at).where(
                        kek_versions.c.version == version
                    )
                )
            ).first()
        if row is None:
            raise KeyRetired(f"KEK version {version} does not exist in the key store")
        if row.material is None:
            raise KeyRetired(f"KEK version {version} was retired on {row.retired_at:%Y-%m-%d}")
        material = self._master.open(row.material, _kek_aad(version), f"KEK version {version}")
        kek = AESGCM(material)
        self._keks[version] = kek
        return kek


def _kek_aad(version: int) -> bytes:
    return b"lethe kek v%d" % version
