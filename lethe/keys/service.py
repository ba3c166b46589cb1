"""Per-subject envelope encryption: the key service that makes personal data shreddable.

Each subject (tenant, subject id) has a data-encryption key (DEK) of its own, with versions,
wrapped by a key-encryption key (KEK) version and kept in the key store. Services encrypt
personal fields with it before writing them anywhere Lethe cannot edit (Kafka events, backups,
documents); an erasure destroys the DEK versions, and every copy becomes unreadable at once.

    from lethe.contracts import Subject
    from lethe.keys.service import open_key_service, place

    keys = await open_key_service()
    sealed = await keys.encrypt(Subject(tenant="t", subject_id="p-1"), b"...",
                                place("kafka", "patient-events", "email"))
    plain = await keys.decrypt(sealed, place("kafka", "patient-events", "email"))

For JSON events and documents, `encrypt_fields` / `decrypt_fields` seal a dict of text fields,
each bound to its own place (`place(*where, field)`), as base64 text.

Ciphertexts are self-describing (`lethe.keys.ciphertext`); the associated data says where the value
lives, so a value copied to another place fails to decrypt. Nonces are random 96-bit; after
LETHE_KEYS_MAX_ENCRYPTIONS encryptions a subject's DEK rolls to a new version. Unwrapped DEKs
stay in memory for LETHE_KEYS_CACHE_SECONDS: a shredding done elsewhere reaches this process
within that time (verification never uses the cache).
"""

from __future__ import annotations

import base64
import binascii
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.ext.asyncio import AsyncEngine

from lethe.contracts import Contract, Subject
from lethe.kernel import database
from lethe.kernel.config import Settings, current_settings
from lethe.kernel.errors import (
    CiphertextRejected,
    ConfigurationError,
    KeyRetired,
    KeyShredded,
    MalformedCiphertext,
    UnknownDataKey,
)
from lethe.kernel.subjects import subject_ref
from lethe.keys import ciphertext, sealing
from lethe.keys import store as key_store
from lethe.keys.kek import KekProvider, KekVersion, LocalKekProvider
from lethe.keys.store import DataKeyRow

DEK_BYTES = 32
RESERVE_BLOCK = 256
CACHE_ENTRIES = 50_000
_SEPARATOR = "\x1f"


def place(*parts: str) -> bytes:
    """Associated data naming where a value lives, e.g. `place("sql", "patients", "email")`."""
    if not parts:
        raise ValueError("a place names at least one part (the system)")
    for part in parts:
        if not part or _SEPARATOR in part:
            raise ValueError("each part of a place is a non-empty string without \\x1f")
    return _SEPARATOR.join(parts).encode()


def dek_aad(ref: str, version: int) -> bytes:
    """What a wrapped DEK is bound to: its subject and version, so rows cannot be swapped."""
    return f"lethe dek|{ref}|{version}".encode()


class KeyStatus(Contract):
    """The key service at a glance: KEK versions and how many data keys each wraps."""

    versions: list[KekVersion]
    min_decrypt_version: int
    data_keys_by_kek: dict[int, int]
    shredded_subjects: int


class RewrapBatch(Contract):
    """One batch of a rotation: keys rewrapped, and the cursor to resume after."""

    rewrapped: int
    scanned: int
    last: tuple[str, int] | None
    """The last key scanned, in key order; None when no key was left below the target."""


@dataclass(slots=True)
class _Budget:
    version: int
    cipher: AESGCM
    left: int
    expires: float


class KeyService:
    """Encrypt, decrypt and shred under per-subject data keys; rewrap them for rotation."""

    def __init__(
        self,
        engine: AsyncEngine,
        provider: KekProvider,
        subject_key: bytes | None,
        *,
        max_encryptions: int = 2**32,
        cache_seconds: float = 60.0,
    ) -> None:
        self.engine = engine
        self.provider = provider
        self._subject_key = subject_key
        self._max = max_encryptions
        self._ttl = cache_seconds
        self._budgets: dict[str, _Budget] = {}
        self._ciphers: dict[tuple[str, int], tuple[float, AESGCM]] = {}

    async def close(self) -> None:
        """Forget every cached key and close the key store's connections."""
        self._budgets.clear()
        self._ciphers.clear()
        await database.dispose(self.engine)

    def subject_ref(self, tenant: str, subject_id: str) -> str:
        """The subject's reference, the only form in which the key store names it."""
        if self._subject_key is None:
            raise ConfigurationError(
                "LETHE_SUBJECT_KEY is not set: encrypting for a subject needs it to make the "
                "subject's reference"
            )
        return subject_ref(tenant, subject_id, self._subject_key)

    async def encrypt(self, subject: Subject, plaintext: bytes, aad: bytes = b"") -> bytes:
        """`plaintext` sealed under the subject's current DEK version, bound to `aad`."""
        ref = self.subject_ref(subject.tenant, subject.subject_id)
        budget = self._budgets.get(ref)
        if budget is None or budget.left <= 0 or budget.expires < time.monotonic():
            budget = await self._new_budget(ref, subject.tenant)
            if len(self._budgets) >= CACHE_ENTRIES:
                del self._budgets[next(iter(self._budgets))]
            self._budgets[ref] = budget
        budget.left -= 1
        header = ciphertext.Header(ref, budget.version, os.urandom(sealing.NONCE_BYTES))
        packed = header.pack()
        sealed = budget.cipher.encrypt(
            header.nonce, plaintext, ciphertext.associated_data(packed, aad)
        )
        return packed + sealed

    async def decrypt(self, value: bytes, aad: bytes = b"", *, cached: bool = True) -> bytes:
        """The plaintext of a value `encrypt` sealed with the same `aad`.

        Raises MalformedCiphertext, CiphertextRejected (altered, or other associated data),
        KeyShredded (the subject was erased), UnknownDataKey or KeyRetired.
        """
        header, packed, body = ciphertext.parse(value)
        cipher = await self._cipher(header.subject_ref, header.dek_version, cached=cached)
        try:
            return cipher.decrypt(header.nonce, body, ciphertext.associated_data(packed, aad))
        except InvalidTag:
            raise CiphertextRejected(
                "ciphertext failed authentication: it was altered, or it is read with other "
                "associated data than it was written with (another system, table or column)"
            ) from None

    async def encrypt_fields(
        self, subject: Subject, fields: Mapping[str, str], *where: str
    ) -> dict[str, str]:
        """Each text field sealed under the subject's key, bound to `place(*where, name)`, as
        base64 (ready for a JSON event or document)."""
        return {
            name: base64.b64encode(
                await self.encrypt(subject, value.encode(), place(*where, name))
            ).decode()
            for name, value in fields.items()
        }

    async def decrypt_fields(
        self, sealed: Mapping[str, str], *where: str, cached: bool = True
    ) -> dict[str, str]:
        """The text fields `encrypt_fields` sealed at the same place; KeyShredded once the
        subject is erased (and the errors of `decrypt`)."""
        opened = {}
        for name, value in sealed.items():
            try:
                raw = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise MalformedCiphertext(f"field {name[:60]!r} is not base64") from None
            plain = await self.decrypt(raw, place(*where, name), cached=cached)
            opened[name] = plain.decode()
        return opened

    async def shred(self, ref: str, tenant: str, request_id: str) -> int:
        """Destroy every DEK version of the subject `ref`; how many versions were destroyed."""
        destroyed = await key_store.shred(self.engine, ref, tenant, request_id)
        self.forget(ref)
        return destroyed

    def forget(self, ref: str) -> None:
        """Drop the subject's keys from this process's memory."""
        self._budgets.pop(ref, None)
        for cached in [k for k in self._ciphers if k[0] == ref]:
            del self._ciphers[cached]

    async def rewrap_batch(
        self, target: int, after: tuple[str, int] | None, limit: int
    ) -> RewrapBatch:
        """Rewrap up to `limit` DEKs still wrapped by a KEK older than `target`, after `after`."""
        rows = await key_store.keys_below(self.engine, target, after, limit)
        rewrapped = []
        for row in rows:
            aad = dek_aad(row.subject_ref, row.version)
            key = await self.provider.unwrap(row.kek_version, row.wrapped, aad)
            rewrapped.append((row, target, await self.provider.wrap(target, key, aad)))
        changed = await key_store.rewrap(self.engine, rewrapped)
        last = key_store.key_order(rows[-1]) if rows else None
        return RewrapBatch(rewrapped=changed, scanned=len(rows), last=last)

    async def status(self) -> KeyStatus:
        """KEK versions, the minimum decryption version, and data keys per KEK version."""
        versions = await self.provider.versions()
        return KeyStatus(
            versions=versions,
            min_decrypt_version=await self.provider.min_decrypt_version(),
            data_keys_by_kek=await key_store.count_by_kek(self.engine),
            shredded_subjects=await key_store.count_shredded(self.engine),
        )

    async def _new_budget(self, ref: str, tenant: str) -> _Budget:
        shredded_at = await key_store.shredding_of(self.engine, ref)
        if shredded_at is not None:
            raise KeyShredded(
                f"subject {ref} was erased (its keys were shredded on {shredded_at:%Y-%m-%d}); "
                "Lethe does not make new keys for an erased subject"
            )
        block = min(RESERVE_BLOCK, self._max)
        while True:
            latest = await key_store.latest_key(self.engine, ref)
            if latest is None or latest.encryptions >= self._max:
                await self._add_version(ref, tenant, 1 if latest is None else latest.version + 1)
                continue
            total = await key_store.reserve(self.engine, ref, latest.version, block)
            if total is None:
                continue  # shredded or replaced meanwhile: look again
            granted = min(block, self._max - (total - block))
            if granted <= 0:
                continue  # someone else used the rest of this version
            cipher = await self._unwrapped(latest)
            return _Budget(latest.version, cipher, granted, time.monotonic() + self._ttl)

    async def _add_version(self, ref: str, tenant: str, version: int) -> None:
        key, aad = os.urandom(DEK_BYTES), dek_aad(ref, version)
        for fresh in (False, True):
            kek_version = await self.provider.current_version(fresh=fresh)
            wrapped = await self.provider.wrap(kek_version, key, aad)
            row = DataKeyRow(ref, version, tenant, kek_version, wrapped, encryptions=0)
            added = await key_store.add_key(self.engine, row)
            if added != "stale_kek":  # else a rotation raised the minimum: wrap under the newest
                break
        if added == "stale_kek":
            raise KeyRetired(
                f"KEK version {kek_version} is below the minimum decryption version even when "
                "read fresh: the key store's KEK state is inconsistent"
            )
        if added == "shredded":
            raise KeyShredded(
                f"subject {ref} was erased while this key was being made (its keys were "
                "shredded); Lethe does not make new keys for an erased subject"
            )

    async def _cipher(self, ref: str, version: int, *, cached: bool) -> AESGCM:
        now = time.monotonic()
        hit = self._ciphers.get((ref, version)) if cached else None
        if hit is not None and hit[0] > now:
            return hit[1]
        shredded_at = await key_store.shredding_of(self.engine, ref)
        if shredded_at is not None:
            self.forget(ref)
            raise KeyShredded(
                f"the data keys of subject {ref} were destroyed (crypto-shredded) on "
                f"{shredded_at:%Y-%m-%d} by an erasure: this value can never be decrypted"
            )
        row = await key_store.key_version(self.engine, ref, version)
        if row is None:
            raise UnknownDataKey(
                f"the key store has no data key version {version} for subject {ref}: the value "
                "was written against another key store, or the key store lost that key"
            )
        return await self._unwrapped(row)

    async def _unwrapped(self, row: DataKeyRow) -> AESGCM:
        key = await self.provider.unwrap(
            row.kek_version, row.wrapped, dek_aad(row.subject_ref, row.version)
        )
        cipher = AESGCM(key)
        if len(self._ciphers) >= CACHE_ENTRIES:
            del self._ciphers[next(iter(self._ciphers))]  # the oldest entry
        self._ciphers[(row.subject_ref, row.version)] = (time.monotonic() + self._ttl, cipher)
        return cipher


async def open_key_service(settings: Settings | None = None) -> KeyService:
    """The key service as the settings describe it (LETHE_KEYS_*, LETHE_SUBJECT_KEY)."""
    settings = settings or current_settings()
    engine = await key_store.key_engine(settings.key_store_url)
    provider = LocalKekProvider(
        engine, settings.keys_master_key_bytes, cache_seconds=settings.keys_cache_seconds
    )
    return KeyService(
        engine,
        provider,
        settings.subject_key_bytes if settings.subject_key is not None else None,
        max_encryptions=settings.keys_max_encryptions,
        cache_seconds=settings.keys_cache_seconds,
    )
