"""Encrypt and decrypt, microseconds per value: `KeyService` against bare AES-GCM."""

from __future__ import annotations

import os
import secrets
import time

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel

from lethe.contracts import Subject
from lethe.keys.service import KeyService, place


class PerValue(BaseModel):
    """Microseconds per value: Lethe and the bare AESGCM floor."""

    lethe_encrypt_us: float
    floor_encrypt_us: float
    lethe_decrypt_us: float
    floor_decrypt_us: float


async def per_value(keys: KeyService, values: int) -> PerValue:
    """Encrypt and decrypt `values` fields for 100 subjects, warm, against bare AESGCM."""
    subjects = [Subject(tenant="bench", subject_id=f"s{n}") for n in range(100)]
    field, where = secrets.token_bytes(64), place("kafka", "bench-events", "email")
    for subject in subjects:  # warm: keys made, unwrapped and cached
        await keys.decrypt(await keys.encrypt(subject, field, where), where)
    begun = time.perf_counter()
    sealed = [await keys.encrypt(subjects[n % 100], field, where) for n in range(values)]
    lethe_encrypt = time.perf_counter() - begun
    begun = time.perf_counter()
    for value in sealed:
        await keys.decrypt(value, where)
    lethe_decrypt = time.perf_counter() - begun

    ciphers = [AESGCM(os.urandom(32)) for _ in range(100)]
    begun = time.perf_counter()
    bare = []
    for n in range(values):
        nonce = os.urandom(12)
        bare.append((nonce, ciphers[n % 100].encrypt(nonce, field, where)))
    floor_encrypt = time.perf_counter() - begun
    begun = time.perf_counter()
    for n, (nonce, body) in enumerate(bare):
        ciphers[n % 100].decrypt(nonce, body, where)
    floor_decrypt = time.perf_counter() - begun
    us = 1e6 / values
    return PerValue(
        lethe_encrypt_us=lethe_encrypt * us,
        floor_encrypt_us=floor_encrypt * us,
        lethe_decrypt_us=lethe_decrypt * us,
        floor_decrypt_us=floor_decrypt * us,
    )
