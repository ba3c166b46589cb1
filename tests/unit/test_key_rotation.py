"""Key rotation's steps on a SQLite key store: resuming a rewrap, racing a shred, the ledger.

A trigger on the data-key table logs every change of a key's KEK version in the same
transaction as the change (tests/data_keys.py), so the log shows exactly which keys were
rewrapped, and how often.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
import typer
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from lethe.activities.key_rotation import NO_SUBJECT, KeyRotator
from lethe.cli.app import app
from lethe.cli.keys import parse_duration
from lethe.contracts import Subject
from lethe.evidence import ledger
from lethe.evidence.store import engine_for
from lethe.kernel.database import dispose_all
from lethe.kernel.errors import KeyShredded, RotationConflict
from lethe.keys import store as key_store
from lethe.keys.kek import LocalKekProvider
from lethe.keys.rotation import RewrapCall, RewrapProgress, VersionStep
from lethe.keys.service import KeyService, dek_aad, place
from tests.data_keys import TENANT, log_rewraps, rewraps, seed_data_keys, subject_id

WHERE = place("kafka", "patient-events", "email")
MASTER, SUBJECT_KEY = os.urandom(32), os.urandom(32)
KEYS = 250
SAMPLE = [Subject(tenant=TENANT, subject_id=subject_id(n)) for n in range(0, KEYS, 10)]


class ShreddingProvider(LocalKekProvider):
    """Shreds one subject while its key is being rewrapped: an erasure racing the rotation."""

    victim: tuple[str, str] | None = None

    async def wrap(self, version: int, key: bytes, aad: bytes) -> bytes:
        if self.victim is not None and aad == dek_aad(self.victim[0], 1):
            ref, tenant = self.victim
            self.victim = None
            await key_store.shred(self._engine, ref, tenant, "req-racing-erasure")
        return await super().wrap(version, key, aad)


def service_on(engine: AsyncEngine, provider: LocalKekProvider | None = None) -> KeyService:
    """A key service with its own caches, as another process has it."""
    provider = provider or LocalKekProvider(engine, MASTER, cache_seconds=60)
    return KeyService(engine, provider, SUBJECT_KEY, cache_seconds=60)


@pytest.fixture
async def engines(tmp_path: Path) -> AsyncIterator[tuple[AsyncEngine, AsyncEngine]]:
    """The key store with a rewrap log, and Lethe's store (the ledger), both SQLite."""
    keys = await key_store.key_engine(f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}")
    await log_rewraps(keys)
    store = await engine_for(f"sqlite+aiosqlite:///{tmp_path / 'lethe.db'}")
    yield keys, store
    await dispose_all()


async def _sealed(keys: KeyService) -> list[bytes]:
    """Seed KEYS subjects' data keys; values sealed under a sample of them."""
    await seed_data_keys(keys, KEYS)
    return [await keys.encrypt(s, s.subject_id.encode(), WHERE) for s in SAMPLE]


async def _opens_all(engine: AsyncEngine, sealed: list[bytes]) -> bool:
    fresh = service_on(engine)
    opened = [await fresh.decrypt(v, WHERE, cached=False) for v in sealed]
    return opened == [s.subject_id.encode() for s in SAMPLE]


async def test_a_resumed_rewrap_neither_repeats_nor_skips_a_key(
    engines: tuple[AsyncEngine, AsyncEngine],
) -> None:
    engine, store = engines
    keys = service_on(engine)
    sealed = await _sealed(keys)
    rotator = KeyRotator(keys, store, cache_seconds=0)
    plan = await rotator.begin("rotation-1", "dpo")
    assert (plan.target, plan.retire, plan.to_rewrap) == (2, [1], 250)

    # The first attempt rewraps 100 keys, but its worker dies with only its second
    # checkpoint (60 keys) recorded by the server: the retry resumes from there.
    checkpoints: list[RewrapProgress] = []
    call = RewrapCall(target=2, batch_size=30, max_keys=100, max_seconds=60)
    first = await rotator.rewrap(call, checkpoint=checkpoints.append)
    assert (first.scanned, first.rewrapped, first.done) == (100, 100, False)
    assert [c.scanned for c in checkpoints] == [30, 60, 90, 100]
    lost_tail = checkpoints[1]

    retry = call.model_copy(update={"max_keys": 10_000})
    resumed = await rotator.rewrap(retry, lost_tail)
    assert resumed.done
    # Keys 61-100 were rewrapped by the lost attempt and are no longer below the target:
    # the retry scans past them without counting them again.
    assert (resumed.scanned, resumed.rewrapped) == (210, 210)

    log = await rewraps(engine)
    assert set(log) == {(keys.subject_ref(TENANT, subject_id(n)), 1, 1, 2) for n in range(KEYS)}
    assert set(log.values()) == {1}  # each key rewrapped exactly once
    assert await rotator.count_below(2) == 0
    assert await _opens_all(engine, sealed)


async def test_a_key_shredded_during_a_rewrap_stays_shredded(
    engines: tuple[AsyncEngine, AsyncEngine],
) -> None:
    engine, store = engines
    sealed = await _sealed(service_on(engine))
    provider = ShreddingProvider(engine, MASTER, cache_seconds=0)
    keys = service_on(engine, provider)
    victim = SAMPLE[7]
    ref = keys.subject_ref(victim.tenant, victim.subject_id)
    rotator = KeyRotator(keys, store, cache_seconds=0)
    await rotator.begin("rotation-1", "dpo")
    provider.victim = (ref, victim.tenant)

    done = await rotator.rewrap(RewrapCall(target=2, batch_size=100, max_keys=1000, max_seconds=60))

    assert provider.victim is None  # the erasure did run in the middle of a batch
    assert (done.scanned, done.rewrapped, done.done) == (250, 249, True)
    assert await key_store.key_version(engine, ref, 1) is None
    assert ref not in {key[0] for key in await rewraps(engine)}
    fresh = service_on(engine)
    with pytest.raises(KeyShredded):
        await fresh.decrypt(sealed[7], WHERE, cached=False)
    assert await fresh.decrypt(sealed[8], WHERE, cached=False) == SAMPLE[8].subject_id.encode()


async def test_the_minimum_waits_for_a_key_written_under_the_old_version(
    engines: tuple[AsyncEngine, AsyncEngine],
) -> None:
    engine, store = engines
    keys = service_on(engine)
    await _sealed(keys)
    stale = KeyService(  # a process that read the current version before the rotation made one
        engine, LocalKekProvider(engine, MASTER, cache_seconds=3600), SUBJECT_KEY
    )
    assert await stale.provider.current_version() == 1
    rotator = KeyRotator(keys, store, cache_seconds=0)
    await rotator.begin("rotation-1", "dpo")
    call = RewrapCall(target=2, batch_size=500, max_keys=1000, max_seconds=60)
    assert (await rotator.rewrap(call)).rewrapped == 250

    late = await stale.encrypt(Subject(tenant=TENANT, subject_id="late"), b"late", WHERE)
    step = VersionStep(rotation_id="rotation-1", target=2, versions=[1], requested_by="dpo")
    assert await rotator.raise_min_version(step) == 1  # nothing raised, nothing lost
    assert await keys.provider.min_decrypt_version() == 1
    with pytest.raises(RotationConflict, match="1 data key"):
        await rotator.retire(step)

    assert (await rotator.rewrap(call)).rewrapped == 1
    assert await rotator.raise_min_version(step) == 0
    assert await rotator.retire(step) == [1]
    assert await service_on(engine).decrypt(late, WHERE, cached=False) == b"late"
    status = await keys.status()
    assert [(v.version, v.state) for v in status.versions] == [(1, "retired"), (2, "current")]


async def test_each_step_is_recorded_once_however_often_it_runs(
    engines: tuple[AsyncEngine, AsyncEngine],
) -> None:
    engine, store = engines
    keys = service_on(engine)
    await _sealed(keys)
    rotator = KeyRotator(keys, store, cache_seconds=30)
    plan = await rotator.begin("rotation-1", "dpo")
    assert await rotator.begin("rotation-1", "dpo") == plan  # a retried activity
    assert plan.settle_seconds >= 30
    call = RewrapCall(target=plan.target, batch_size=1000, max_keys=1000, max_seconds=60)
    await rotator.rewrap(call)
    step = VersionStep(
        rotation_id="rotation-1", target=plan.target, versions=plan.retire, requested_by="dpo"
    )
    for _ in range(2):
        assert await rotator.raise_min_version(step) == 0
        assert await rotator.retire(step) == [1]

    entries = await ledger.entries(store, "rotation-1")
    assert [(e.action, e.details["version"]) for e in entries] == [
        ("kek.version_created", 2),
        ("kek.min_decrypt_raised", 2),
        ("kek.version_retired", 1),
    ]
    assert {(e.subject_ref, e.actor) for e in entries} == {(NO_SUBJECT, "dpo")}
    assert (await ledger.verify_chain(store)).intact
    assert len(await key_store.count_by_kek(engine)) == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90d", timedelta(days=90)),
        ("12h", timedelta(hours=12)),
        ("30M", timedelta(minutes=30)),
        (" 1d12h ", timedelta(days=1, hours=12)),
        ("2w", timedelta(weeks=2)),
        ("0s", timedelta(0)),
    ],
)
def test_durations_parse(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "90", "d", "7 days", "-1d", "1.5h", "1y"])
def test_other_durations_are_refused_by_name(text: str) -> None:
    with pytest.raises(typer.BadParameter, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["keys", "rotate", "--grace", "7 days"], "not a duration"),
        (["keys", "rotate", "--batch-size", "0"], "--batch-size"),
        (["schedule", "key-rotation", "--every", "90"], "not a duration"),
        (["schedule", "key-rotation", "--every", "999999999999d"], "too long"),
        (["schedule", "key-rotation", "--every", "10m"], "at most every 1h"),
        (["schedule", "key-rotation", "--every", "5d"], "longer than --grace"),
        (["schedule", "key-rotation", "--every", "2d", "--grace", "2d"], "longer than --grace"),
    ],
)
def test_bad_rotation_input_is_a_usage_error(args: list[str], expected: str) -> None:
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "Traceback" not in result.output
