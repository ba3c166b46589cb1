"""Key rotation on the stack: PostgreSQL key stores and the Temporal dev server.

Each test gets a database of its own on the stack's PostgreSQL (key store and ledger), a
control queue of its own and so a rotation of its own, and drops the database afterwards: the
shared `lethe_keys` store is never touched. The key store logs every rewrap it commits
(tests/data_keys.py), so "no key wrapped twice or skipped" is read from the database itself.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client as TemporalClient
from temporalio.worker import Worker

from lethe.activities.key_rotation import KeyRotations
from lethe.contracts import Subject
from lethe.evidence import ledger
from lethe.evidence.store import engine_for
from lethe.kernel.config import Settings, current_settings
from lethe.kernel.database import dispose_all
from lethe.kernel.errors import ServiceUnavailable
from lethe.keys import store as key_store
from lethe.keys.kek import LocalKekProvider
from lethe.keys.rotation import RewrapProgress, RotationRequest, rotation_schedule_id
from lethe.keys.service import KeyService, place
from lethe.sdk.rotation import rotation_progress, schedule_rotation, start_rotation
from lethe.temporal.connection import connect
from lethe.workflows.key_rotation import KeyRotationWorkflow
from tests.data_keys import TENANT, log_rewraps, rewraps, seed_data_keys, subject_id
from tests.e2e.conftest import WorkerProcess, run_lethe
from tests.key_stores import fresh_key_store

WHERE = place("kafka", "patient-events", "email")
CACHE_SECONDS = "1"
"""Every process of a deployment keeps KEK versions this long (LETHE_KEYS_CACHE_SECONDS)."""


@dataclass
class Deployment:
    """A key store, a ledger and a control queue of one test's own."""

    suffix: str
    database_url: str
    engine: AsyncEngine
    env: dict[str, str]
    temporal: TemporalClient
    """A client of the stack's Temporal whose codec reads the test's key store, as workers do."""

    @property
    def control_queue(self) -> str:
        """The test's control queue; its rotation's workflow id follows from it."""
        return self.env["LETHE_CONTROL_QUEUE"]

    def settings(self) -> Settings:
        """The settings the activities read (the test's environment is the deployment's)."""
        return current_settings()

    def key_service(self, *, max_encryptions: int = 2**32) -> KeyService:
        """A key service with caches of its own, as another process of the deployment has."""
        settings = self.settings()
        provider = LocalKekProvider(
            self.engine, settings.keys_master_key_bytes, cache_seconds=settings.keys_cache_seconds
        )
        return KeyService(
            self.engine,
            provider,
            settings.subject_key_bytes,
            max_encryptions=max_encryptions,
            cache_seconds=settings.keys_cache_seconds,
        )


@pytest.fixture
async def deployment(
    monkeypatch: pytest.MonkeyPatch, stack_temporal: TemporalClient
) -> AsyncIterator[Deployment]:
    """A fresh database on the stack's PostgreSQL for the key store and the ledger, and a
    control queue of its own; the environment points at them; all dropped afterwards.

    The payload codec's keys live in the key store too, so the test's Temporal client and its
    workers share the fresh store's codec key. Asking for `stack_temporal` first makes a
    Temporal server that is down fail the test by name.
    """
    async with fresh_key_store("rotation") as url:
        suffix = uuid.uuid4().hex[:8]
        env = {
            "LETHE_KEYS_STORE_URL": url,
            "LETHE_STORE_URL": url,
            "LETHE_KEYS_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
            "LETHE_KEYS_CACHE_SECONDS": CACHE_SECONDS,
            "LETHE_CONTROL_QUEUE": f"lethe-rotation-{suffix}",
        }
        for variable, value in env.items():
            monkeypatch.setenv(variable, value)
        found = Deployment(
            suffix=suffix,
            database_url=url,
            engine=await key_store.key_engine(url),
            env={**os.environ, **env},
            temporal=await connect(current_settings()),
        )
        try:
            yield found
        finally:
            await _terminate_rotation(found)
            await dispose_all()


async def _terminate_rotation(deployment: Deployment) -> None:
    """End a rotation a failed test left running (no worker will serve its queue again)."""
    temporal = deployment.temporal
    query = f"TaskQueue = '{deployment.control_queue}' AND ExecutionStatus = 'Running'"
    async for execution in temporal.list_workflows(query):
        await temporal.get_workflow_handle(execution.id).terminate(reason="test ended")


async def _sealed_sample(keys: KeyService, count: int, every: int) -> list[tuple[bytes, bytes]]:
    sample = [Subject(tenant=TENANT, subject_id=subject_id(n)) for n in range(0, count, every)]
    return [
        (await keys.encrypt(s, s.subject_id.encode(), WHERE), s.subject_id.encode()) for s in sample
    ]


async def _all_open(deployment: Deployment, sealed: list[tuple[bytes, bytes]]) -> list[str]:
    """The values that no longer decrypt to what was sealed (read with empty caches)."""
    reader = deployment.key_service()
    wrong = []
    for value, expected in sealed:
        try:
            if await reader.decrypt(value, WHERE, cached=False) != expected:
                wrong.append(f"{expected!r}: other plaintext")
        except Exception as exc:
            wrong.append(f"{expected!r}: {type(exc).__name__}: {exc}")
    return wrong


async def _rotation_entries(deployment: Deployment, rotation_id: str) -> list[tuple[str, object]]:
    store = await engine_for(deployment.database_url)
    return [(e.action, e.details["version"]) for e in await ledger.entries(store, rotation_id)]


# --- (a) encryption and decryption go on while the rotation runs -------------------------------


@dataclass
class Traffic:
    """What services did while the rotation ran, and every error they met."""

    sealed: list[tuple[bytes, bytes]]
    errors: list[str] = field(default_factory=list)
    encrypted: int = 0
    decrypted: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def _writer(keys: KeyService, traffic: Traffic, me: int, seeded: int) -> None:
    """Encrypt for new subjects (new data keys, under whatever KEK this process thinks is
    current), hot subjects (their data keys roll to new versions) and seeded ones."""
    n = 0
    while not traffic.stop.is_set():
        kind = n % 3
        if kind == 0:
            name = f"new-{me}-{n}"
        elif kind == 1:
            name = f"hot-{n % 7}"
        else:
            name = subject_id(random.randrange(seeded))
        plain = f"{name}/{me}/{n}".encode()
        try:
            value = await keys.encrypt(Subject(tenant=TENANT, subject_id=name), plain, WHERE)
        except Exception as exc:
            traffic.errors.append(f"encrypt: {type(exc).__name__}: {exc}")
        else:
            traffic.sealed.append((value, plain))
            traffic.encrypted += 1
        n += 1
        await asyncio.sleep(0.002)


async def _reader(keys: KeyService, traffic: Traffic) -> None:
    """Decrypt values written before and during the rotation, cached and not."""
    while not traffic.stop.is_set():
        value, plain = random.choice(traffic.sealed)
        try:
            opened = await keys.decrypt(value, WHERE, cached=random.random() < 0.5)
        except Exception as exc:
            traffic.errors.append(f"decrypt: {type(exc).__name__}: {exc}")
        else:
            if opened != plain:
                traffic.errors.append("decrypt: another plaintext came back")
            traffic.decrypted += 1
        await asyncio.sleep(0.001)


@pytest.mark.timeout(240)
async def test_rotation_under_encrypt_and_decrypt_traffic_loses_nothing(
    deployment: Deployment,
) -> None:
    seeded = 3000
    keys = deployment.key_service()
    await seed_data_keys(keys, seeded)
    await log_rewraps(keys.engine)
    traffic = Traffic(sealed=await _sealed_sample(keys, seeded, 30))
    services = [deployment.key_service(max_encryptions=20) for _ in range(6)]
    tasks = [
        *(asyncio.create_task(_writer(s, traffic, n, seeded)) for n, s in enumerate(services[:3])),
        *(asyncio.create_task(_reader(s, traffic)) for s in services[3:]),
    ]
    request = RotationRequest(batch_size=100, grace=timedelta(seconds=1), requested_by="test")
    queue, temporal = deployment.control_queue, deployment.temporal
    try:
        async with Worker(
            temporal,
            task_queue=queue,
            workflows=[KeyRotationWorkflow],
            activities=KeyRotations().activities(),
        ):
            await asyncio.sleep(1)  # traffic before the rotation
            before = traffic.encrypted
            handle, joined = await start_rotation(temporal, queue, request)
            assert not joined
            again, joined = await start_rotation(temporal, queue, request)
            assert (again.id, joined) == (handle.id, True)
            result = await asyncio.wait_for(handle.result(), 180)
            during = traffic.encrypted - before
    finally:
        traffic.stop.set()
        await asyncio.gather(*tasks)

    assert traffic.errors == []
    assert during > 100 and traffic.decrypted > 100, (during, traffic.decrypted)
    assert (result.target, result.retired) == (2, [1])
    assert await _all_open(deployment, traffic.sealed) == []

    status = await deployment.key_service().status()
    assert set(status.data_keys_by_kek) == {2}
    assert status.data_keys_by_kek[2] > seeded  # traffic made data keys during the rotation
    assert [(v.version, v.state) for v in status.versions] == [(1, "retired"), (2, "current")]
    assert status.min_decrypt_version == 2
    log = await rewraps(keys.engine)
    assert set(log.values()) == {1}, "a data key was rewrapped twice"
    assert {(old, new) for _, _, old, new in log} == {(1, 2)}
    assert len(log) >= seeded
    assert await _rotation_entries(deployment, result.rotation_id) == [
        ("kek.version_created", 2),
        ("kek.min_decrypt_raised", 2),
        ("kek.version_retired", 1),
    ]


# --- (b) the worker is killed in the middle of a rewrap ------------------------------------------


async def _checkpoint(temporal: TemporalClient, workflow_id: str) -> RewrapProgress | None:
    """The rewrap checkpoint the server holds for the running `keys.rewrap` call, if any."""
    described = await temporal.get_workflow_handle(workflow_id).describe()
    for pending in described.raw_description.pending_activities:
        if pending.activity_type.name == "keys.rewrap" and pending.heartbeat_details.payloads:
            decoded = await temporal.data_converter.decode(
                pending.heartbeat_details.payloads, [RewrapProgress]
            )
            progress: RewrapProgress = decoded[0]
            return progress
    return None


@pytest.mark.timeout(300)
async def test_a_worker_killed_mid_rewrap_is_replaced_and_no_key_is_wrapped_twice(
    deployment: Deployment, tmp_path: Path
) -> None:
    """SIGKILL the only worker while its `keys.rewrap` call is half-way through 20,000 keys.

    The server holds the call's last heartbeated checkpoint; after the heartbeat timeout the
    call is retried on a new worker process, which resumes from that checkpoint. Keys the
    killed call rewrapped after its checkpoint are no longer below the target, so the retry
    scans past them; the key store's log shows every key rewrapped exactly once.
    """
    count = 20_000
    keys = deployment.key_service()
    await seed_data_keys(keys, count)
    await log_rewraps(keys.engine)
    sealed = await _sealed_sample(keys, count, 400)
    region = f"rot{deployment.suffix}"
    env = {**deployment.env, "LETHE_WORKER_SHUTDOWN_GRACE_SECONDS": "5", "PYTHONUNBUFFERED": "1"}
    temporal = deployment.temporal
    first = WorkerProcess(region, env, tmp_path / "worker-1.log")
    second = WorkerProcess(region, env, tmp_path / "worker-2.log")
    try:
        await first.start()
        request = RotationRequest(batch_size=20, grace=timedelta(seconds=1), requested_by="test")
        handle, _ = await start_rotation(temporal, deployment.control_queue, request)

        async with asyncio.timeout(60):
            while True:
                checkpoint = await _checkpoint(temporal, handle.id)
                done = (await key_store.count_by_kek(keys.engine)).get(2, 0)
                if checkpoint is not None and checkpoint.scanned > 0 and done >= 2000:
                    break
                await asyncio.sleep(0.05)
        await first.kill()
        assert first.process is not None and first.process.returncode == -9
        at_kill = (await key_store.count_by_kek(keys.engine)).get(2, 0)
        assert at_kill < count, "the rotation finished before the worker could be killed"
        with pytest.raises(ServiceUnavailable, match="queries are answered by a control worker"):
            await rotation_progress(temporal, handle.id, timedelta(seconds=5))

        await second.start()
        progress = await rotation_progress(temporal, handle.id)
        assert progress.phase == "rewrapping"  # the call is retried once its heartbeat times out
        result = await asyncio.wait_for(handle.result(), 180)

        assert result.resumes >= 1  # the retry started from the server's checkpoint
        assert (result.passes, result.target, result.retired) == (1, 2, [1])
        assert result.rewrapped <= count  # the killed call's unreported tail is not counted
        log = await rewraps(keys.engine)
        assert len(log) == count and set(log.values()) == {1}
        assert {(old, new) for _, _, old, new in log} == {(1, 2)}
        assert await key_store.count_by_kek(keys.engine) == {2: count}
        assert await _all_open(deployment, sealed) == []
        assert await _rotation_entries(deployment, result.rotation_id) == [
            ("kek.version_created", 2),
            ("kek.min_decrypt_raised", 2),
            ("kek.version_retired", 1),
        ]
        assert "shutting down" not in first.log_text()  # it was killed, not stopped

        status = await run_lethe(deployment.env, "keys", "status", "--json")
        assert status.code == 0, status.stderr
        shown = status.json()
        assert [(v["version"], v["state"]) for v in shown["keys"]["versions"]] == [
            (1, "retired"),
            (2, "current"),
        ]
        assert shown["keys"]["data_keys_by_kek"] == {"2": count}
        assert shown["keys"]["min_decrypt_version"] == 2
    finally:
        await first.stop()
        await second.stop()


# --- the Schedule --------------------------------------------------------------------------------


async def test_the_schedule_is_created_then_updated(deployment: Deployment) -> None:
    queue, temporal = deployment.control_queue, deployment.temporal
    request = RotationRequest(grace=timedelta(days=7), requested_by="dpo")
    schedule_id = rotation_schedule_id(queue)
    try:
        made = await schedule_rotation(temporal, queue, timedelta(days=90), request)
        assert made[:2] == (schedule_id, True) and made[2]
        changed = await schedule_rotation(temporal, queue, timedelta(days=30), request)
        assert changed[:2] == (schedule_id, False)
        described = await temporal.get_schedule_handle(schedule_id).describe()
        spec = described.schedule.spec
        assert [interval.every for interval in spec.intervals] == [timedelta(days=30)]
        assert described.schedule.policy.overlap.name == "SKIP"
        upcoming = described.info.next_action_times
        assert upcoming and upcoming[1] - upcoming[0] == timedelta(days=30)
    finally:
        await temporal.get_schedule_handle(schedule_id).delete()
