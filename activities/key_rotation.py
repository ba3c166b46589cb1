"""Key rotation's activities: make a KEK version, rewrap data keys, raise the minimum, retire.

`KeyRotator` does the work on a `KeyService` and Lethe's ledger, testable without Temporal; the
`keys.*` activities are thin wrappers, methods of the worker's `KeyRotations`. Every step is safe
to run again: the version is made once per rotation id, a rewrap only replaces the wrapping it
read (so a key is never wrapped twice, and a key shredded meanwhile is not brought back), and the
ledger appends once per key.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import activity

from lethe.evidence import ledger
from lethe.evidence.ledger import Details
from lethe.evidence.store import engine_for
from lethe.kernel.config import Settings, current_settings
from lethe.kernel.errors import LetheError, RotationConflict
from lethe.keys import store as key_store
from lethe.keys.rotation import RewrapCall, RewrapProgress, RotationPlan, VersionStep
from lethe.keys.service import KeyService, open_key_service

T = TypeVar("T")

NO_SUBJECT = "-"
"""The ledger's subject reference for key-management entries. The column is required (erasure
entries always name a subject), but a KEK version concerns no one in particular: "-" is never a
subject reference (those are 32 hex characters)."""
SETTLE_MARGIN_SECONDS = 5.0
"""Beyond the KEK cache time: an encryption that read the old version just before its cache
expired may still be storing its new data key."""


def _ignore(_: RewrapProgress) -> None:
    return None


class KeyRotator:
    """The steps of a key rotation, on one key service, each recorded in the ledger."""

    def __init__(self, keys: KeyService, ledger_engine: AsyncEngine, *, cache_seconds: float):
        """`cache_seconds`: how long any process may keep using the old KEK version for new keys
        (LETHE_KEYS_CACHE_SECONDS, the same in every process of a deployment)."""
        self.keys = keys
        self._ledger = ledger_engine
        self._cache_seconds = cache_seconds

    async def begin(self, rotation_id: str, requested_by: str) -> RotationPlan:
        """Make the rotation's KEK version (once per rotation id); what to rewrap and retire."""
        provider = self.keys.provider
        target = await provider.create_version(rotation_id=rotation_id)
        retire = [
            v.version
            for v in await provider.versions()
            if v.version < target and v.state != "retired"
        ]
        to_rewrap = await key_store.count_below(self.keys.engine, target)
        await self._record(
            rotation_id,
            requested_by,
            "kek.version_created",
            target,
            {"version": target, "to_retire": ",".join(map(str, retire)), "to_rewrap": to_rewrap},
        )
        return RotationPlan(
            target=target,
            retire=retire,
            to_rewrap=to_rewrap,
            settle_seconds=self._cache_seconds + SETTLE_MARGIN_SECONDS,
        )

    async def rewrap(
        self,
        call: RewrapCall,
        start: RewrapProgress | None = None,
        checkpoint: Callable[[RewrapProgress], None] = _ignore,
    ) -> RewrapProgress:
        """Rewrap keys below the target in batches, from `start` (a checkpoint) or `call.after`,
        until the end or `call.max_keys` scanned or `call.max_seconds` spent; `checkpoint` after
        each batch.

        The cursor is keyset (subject reference, version), so resuming from any checkpoint
        neither repeats nor skips a key; keys already rewrapped are no longer below the target.
        """
        progress = start or RewrapProgress(cursor=call.after)
        deadline = time.monotonic() + call.max_seconds
        while not progress.done and time.monotonic() < deadline:
            left = call.max_keys - progress.scanned
            if left <= 0:
                break
            limit = min(call.batch_size, left)
            batch = await self.keys.rewrap_batch(call.target, progress.cursor, limit)
            progress = progress.model_copy(
                update={
                    "rewrapped": progress.rewrapped + batch.rewrapped,
                    "scanned": progress.scanned + batch.scanned,
                    "cursor": batch.last or progress.cursor,
                    "done": batch.scanned < limit,
                }
            )
            checkpoint(progress)
        return progress

    async def count_below(self, target: int) -> int:
        """How many data keys a KEK older than `target` still wraps."""
        return await key_store.count_below(self.keys.engine, target)

    async def raise_min_version(self, step: VersionStep) -> int:
        """Raise the minimum decryption version to the target; the keys still below it, if any
        (then nothing was raised, and they are to be rewrapped first)."""
        left = await self.count_below(step.target)
        if left:
            return left
        try:
            await self.keys.provider.raise_min_decrypt_version(step.target)
        except RotationConflict:
            # A new data key under an old version landed between the count and the raise.
            left = await self.count_below(step.target)
            if left:
                return left
            raise
        await self._record(
            step.rotation_id,
            step.requested_by,
            "kek.min_decrypt_raised",
            step.target,
            {"version": step.target},
        )
        return 0

    async def retire(self, step: VersionStep) -> list[int]:
        """Destroy the versions in `step.versions` (idempotent); refused, destroying nothing,
        while any data key is still wrapped by a version older than the target."""
        left = await self.count_below(step.target)
        if left:
            raise RotationConflict(
                f"{left} data key(s) are still wrapped by a KEK older than version "
                f"{step.target} although the minimum decryption version was raised; the older "
                "versions are kept (disabled, not destroyed) so that these keys can be recovered"
            )
        for version in step.versions:
            await self.keys.provider.retire(version)
            await self._record(
                step.rotation_id,
                step.requested_by,
                "kek.version_retired",
                version,
                {"version": version, "replaced_by": step.target},
            )
        return list(step.versions)

    async def _record(
        self, rotation_id: str, actor: str, action: str, version: int, details: Details
    ) -> None:
        await ledger.append(
            self._ledger,
            idempotency_key=f"{rotation_id}/{action}/{version}",
            request_id=rotation_id,
            subject_ref=NO_SUBJECT,
            actor=actor,
            action=action,
            details={**details, "rotation": rotation_id},
        )


class KeyRotations:
    """A worker's key-rotation activities, over one rotator it keeps (with its KEK cache) for the
    process's settings; made new when the settings change or the engines were disposed."""

    def __init__(self) -> None:
        """No rotator yet: the first activity makes it."""
        self._rotator: KeyRotator | None = None
        self._settings: Settings | None = None

    def activities(self) -> list[Callable[..., Awaitable[Any]]]:
        """The `keys.*` activities, for the control worker."""
        return [
            self.begin_rotation,
            self.rewrap,
            self.count_below,
            self.raise_min_version,
            self.retire,
        ]

    async def rotator(self) -> KeyRotator:
        """The rotator for the process's settings (one key service, its KEK cache kept)."""
        settings = current_settings()
        engine = await key_store.key_engine(settings.key_store_url)
        found = self._rotator
        if found is None or self._settings != settings or found.keys.engine is not engine:
            found = KeyRotator(
                await open_key_service(settings),
                await engine_for(settings.store_url.get_secret_value()),
                cache_seconds=settings.keys_cache_seconds,
            )
            self._rotator, self._settings = found, settings
        return found

    @activity.defn(name="keys.begin_rotation")
    async def begin_rotation(self, rotation_id: str, requested_by: str) -> RotationPlan:
        """Make the rotation's KEK version; the target, the versions to retire, the keys to
        rewrap."""
        return await _typed((await self.rotator()).begin(rotation_id, requested_by))

    @activity.defn(name="keys.rewrap")
    async def rewrap(self, call: RewrapCall) -> RewrapProgress:
        """Rewrap data keys in batches, heartbeating the last key done; a retry resumes there."""
        details = activity.info().heartbeat_details
        start = None
        if details:
            start = RewrapProgress.model_validate(details[0]).model_copy(update={"resumed": True})
        return await _typed((await self.rotator()).rewrap(call, start, activity.heartbeat))

    @activity.defn(name="keys.count_below")
    async def count_below(self, target: int) -> int:
        """How many data keys a KEK older than `target` still wraps."""
        return await _typed((await self.rotator()).count_below(target))

    @activity.defn(name="keys.raise_min_version")
    async def raise_min_version(self, step: VersionStep) -> int:
        """Raise the minimum decryption version; the keys left below it (0 when raised)."""
        return await _typed((await self.rotator()).raise_min_version(step))

    @activity.defn(name="keys.retire")
    async def retire(self, step: VersionStep) -> list[int]:
        """Destroy the old KEK versions after the grace period; the versions retired."""
        return await _typed((await self.rotator()).retire(step))


async def _typed(work: Awaitable[T]) -> T:
    try:
        return await work
    except LetheError as exc:
        raise exc.to_application_error() from None
