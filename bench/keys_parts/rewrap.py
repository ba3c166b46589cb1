"""Rewrap throughput, data keys per second: `KeyRotationWorkflow` against the same reads and
writes done directly (keyset-paged select, AES-GCM unwrap and wrap, batched update)."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import bindparam, insert, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncEngine

from bench import BenchError
from lethe.kernel.config import Settings
from lethe.keys import store as key_store
from lethe.keys.rotation import RotationRequest
from lethe.keys.service import DEK_BYTES, KeyService, dek_aad
from lethe.sdk.rotation import rotation_progress, start_rotation
from lethe.temporal.connection import connect
from lethe.worker import build_control_worker

BATCH = 1000
"""Data keys per batch, for the rotation and the floor alike."""


async def seed_deks(keys: KeyService, count: int) -> None:
    """`count` data keys (one per subject) wrapped by the current KEK, inserted in bulk."""
    provider = keys.provider
    kek = await provider.current_version()
    rows = []
    for n in range(count):
        ref = f"{n:032x}"
        wrapped = await provider.wrap(kek, os.urandom(DEK_BYTES), dek_aad(ref, 1))
        rows.append(
            {
                "subject_ref": ref,
                "version": 1,
                "tenant": "bench",
                "kek_version": kek,
                "wrapped": wrapped,
                "encryptions": 0,
                "created_at": datetime.now(UTC),
            }
        )
    async with keys.engine.begin() as conn:
        for start in range(0, len(rows), 5000):
            await conn.execute(insert(key_store.data_keys), rows[start : start + 5000])


async def floor_rewrap(engine: AsyncEngine, old: AESGCM, new: AESGCM, target: int) -> int:
    """The rewrap without Lethe: keyset-paged select, AESGCM unwrap and wrap, batched update."""
    table = key_store.data_keys
    after: tuple[str, int] | None = None
    done = 0
    statement = (
        update(table)
        .where(
            table.c.subject_ref == bindparam("ref"),
            table.c.version == bindparam("ver"),
            table.c.kek_version == bindparam("old_kek"),
        )
        .values(kek_version=bindparam("new_kek"), wrapped=bindparam("new_wrapped"))
    )
    while True:
        query = select(table).where(table.c.kek_version < target)
        if after is not None:
            query = query.where(tuple_(table.c.subject_ref, table.c.version) > tuple_(*after))
        query = query.order_by(table.c.subject_ref, table.c.version).limit(BATCH)
        async with engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        if not rows:
            return done
        params = []
        for row in rows:
            aad = dek_aad(row.subject_ref, row.version)
            key = old.decrypt(row.wrapped[:12], row.wrapped[12:], aad)
            nonce = os.urandom(12)
            params.append(
                {
                    "ref": row.subject_ref,
                    "ver": row.version,
                    "old_kek": row.kek_version,
                    "new_kek": target,
                    "new_wrapped": nonce + new.encrypt(nonce, key, aad),
                }
            )
        async with engine.begin() as conn:
            await conn.execute(statement, params)
        done += len(rows)
        after = (rows[-1].subject_ref, rows[-1].version)


async def lethe_rewrap(settings: Settings, expected: int) -> float:
    """Data keys per second that `KeyRotationWorkflow` rewraps, from its start to the end of
    its rewrap phase, with a control worker in this process; the workflow is then ended."""
    client = await connect(settings)
    request = RotationRequest(batch_size=BATCH, grace=timedelta(days=1), requested_by="bench")
    async with build_control_worker(client, settings):
        begun = time.perf_counter()
        handle, joined = await start_rotation(client, settings.control_queue, request)
        if joined:
            raise BenchError("a key rotation was already running on this run's control queue")
        try:
            while True:
                progress = await rotation_progress(client, handle.id)
                if progress.phase not in ("creating", "rewrapping"):
                    break
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - begun
        finally:
            await handle.terminate("benchmark over")
    if progress.rewrapped < expected:
        raise BenchError(f"the rotation rewrapped {progress.rewrapped} of {expected} keys")
    return progress.rewrapped / elapsed
