"""The key connector's batch shredding against a PostgreSQL key store of this module's own:
hundreds of subjects in one transaction, one canary, verification in a few queries, a subject's
problem failing it alone, retries after a lost worker, and a replay after a restore.

Statements and commits are counted on the key store's engine (SQLAlchemy events on the real
engine): they must not grow with the batch.
"""

from __future__ import annotations

import base64
import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, insert, select
from temporalio.testing import ActivityEnvironment

from lethe.activities import shred
from lethe.activities.connectors import Connectors
from lethe.activities.shred import KeyShredder, canary_place
from lethe.classification.datamap import KeysLocator
from lethe.contracts import BatchStepOutcome, BatchStepRequest, BulkSubject, Subject
from lethe.kernel.config import Settings
from lethe.kernel.errors import KeyShredded
from lethe.keys import store as key_store
from lethe.keys.service import KeyService, place
from tests.key_stores import fresh_key_store, key_rows, key_service
from tests.steps import decision, step

WHERE = place("kafka", "patient-events", "email")
CONNECTION_VARIABLE = "LETHE_TEST_SHRED_BATCH_KEYS_URL"


@pytest.fixture(scope="module")
async def keys_url() -> AsyncIterator[str]:
    """A key-store database of this module's own."""
    async with fresh_key_store("shred_batch") as url:
        yield url


@pytest.fixture
def shredder(keys_url: str, settings: Settings) -> KeyShredder:
    """The connector on the module's key store with the stack's master and subject keys."""
    return KeyShredder(keys_url, settings.keys_master_key_bytes, settings.subject_key_bytes)


@pytest.fixture
async def keys(keys_url: str, settings: Settings) -> KeyService:
    """A service's key service on the same key store (empty caches)."""
    return await key_service(keys_url, settings.keys_master_key_bytes, settings.subject_key_bytes)


def _subjects(count: int) -> list[Subject]:
    tenant = f"clinic-{uuid.uuid4().hex[:8]}"
    return [Subject(tenant=tenant, subject_id=f"patient-{n}") for n in range(count)]


def _batch(keys: KeyService, subjects: list[Subject], request_id: str = "") -> BatchStepRequest:
    started = datetime.now(UTC)
    return BatchStepRequest(
        request_id=request_id or f"bulk-{uuid.uuid4().hex[:8]}",
        batch=3,
        step=step(
            KeysLocator(categories=["user.contact"]),
            action="shred",
            decisions=[decision("delete", rule="gdpr.default")],
        ),
        subjects=[
            BulkSubject(subject_ref=keys.subject_ref(s.tenant, s.subject_id), subject=s)
            for s in subjects
        ],
        erasure_started_at=started,
        window_ends_at=started + timedelta(days=30),
    )


async def _seal(keys: KeyService, subjects: list[Subject]) -> dict[str, bytes]:
    """A value sealed under each subject's key (making the key), by subject id."""
    return {s.subject_id: await keys.encrypt(s, s.subject_id.encode(), WHERE) for s in subjects}


@dataclasses.dataclass
class _Tally:
    statements: int = 0
    commits: int = 0


@contextmanager
def _counted(keys: KeyService) -> Iterator[_Tally]:
    """Statements and commits on the key store's engine (the connector's too: one per URL)."""
    tally = _Tally()
    engine = keys.engine.sync_engine

    def executed(*_: Any) -> None:
        tally.statements += 1

    def committed(*_: Any) -> None:
        tally.commits += 1

    event.listen(engine, "before_cursor_execute", executed)
    event.listen(engine, "commit", committed)
    try:
        yield tally
    finally:
        event.remove(engine, "before_cursor_execute", executed)
        event.remove(engine, "commit", committed)


def _statuses(outcome: BatchStepOutcome) -> set[str]:
    return {o.status for o in outcome.outcomes}


async def test_a_batch_of_hundreds_is_shredded_in_one_transaction(
    shredder: KeyShredder, keys: KeyService, keys_url: str, settings: Settings
) -> None:
    subjects = _subjects(300)
    sealed = await _seal(keys, subjects[:290])  # the last ten subjects never had a key
    capped = KeyService(keys.engine, keys.provider, settings.subject_key_bytes, max_encryptions=1)
    for subject in subjects[:5]:  # five subjects with a second key version
        sealed[f"{subject.subject_id}/2"] = await capped.encrypt(subject, b"second", WHERE)
    others = _subjects(5)
    kept = await _seal(keys, others)
    batch = _batch(keys, subjects)

    with _counted(keys) as tally:
        outcome = await shredder.erase_batch(batch)

    assert _statuses(outcome) == {"done"}, outcome.outcomes[0].detail
    assert [o.subject_ref for o in outcome.outcomes] == [s.subject_ref for s in batch.subjects]
    assert [o.affected for o in outcome.outcomes] == [2] * 5 + [1] * 285 + [0] * 10
    evidence = outcome.evidence
    assert evidence["versions_destroyed"] == 295
    assert (evidence["shredded_subjects"], evidence["data_keys_remaining"]) == (300, 0)
    assert evidence["canary_subject"] == batch.subjects[0].subject_ref
    assert evidence["canary_decryption"] == "KeyShredded"
    # One transaction shreds (the canary's key reservation is the other commit), and the
    # whole batch, erased and verified, takes a few dozen statements.
    assert tally.commits == 2
    assert tally.statements < 40

    fresh = await key_service(keys_url, settings.keys_master_key_bytes, settings.subject_key_bytes)
    records = await _records(keys, [s.subject_ref for s in batch.subjects])
    assert {r.request_id for r in records} == {batch.request_id}
    assert len({r.shredded_at for r in records}) == 1  # written together
    for item in batch.subjects:
        assert await key_rows(keys, item.subject_ref) == []
    for value in sealed.values():
        with pytest.raises(KeyShredded):
            await fresh.decrypt(value, WHERE, cached=False)
    canary = base64.b64decode(str(evidence["canary"]))
    with pytest.raises(KeyShredded):
        await fresh.decrypt(canary, canary_place(batch.request_id), cached=False)
    for subject in others:
        value = kept[subject.subject_id]
        assert await fresh.decrypt(value, WHERE, cached=False) == subject.subject_id.encode()
    assert not any(s.subject_id in repr(outcome) for s in subjects)

    # Again (a retry after a crash between the transaction and the answer): nothing left to
    # destroy, and the key store's records say what the first shredding destroyed.
    again = await shredder.erase_batch(batch)
    assert _statuses(again) == {"done"}
    assert [o.affected for o in again.outcomes] == [o.affected for o in outcome.outcomes]
    assert again.evidence["versions_destroyed"] == 295
    assert again.evidence["canary"] is None
    assert "canary lost: an earlier attempt of this request shredded the keys" in again.detail
    assert "first shredding destroyed 2 version(s)" in again.outcomes[0].detail


async def _records(keys: KeyService, refs: list[str]) -> list[Any]:
    table = key_store.shredded
    async with keys.engine.connect() as conn:
        return list(await conn.execute(select(table).where(table.c.subject_ref.in_(refs))))


async def test_statements_do_not_grow_with_the_batch(
    shredder: KeyShredder, keys: KeyService
) -> None:
    counts = []
    for size in (10, 300):
        subjects = _subjects(size)
        await _seal(keys, subjects)
        with _counted(keys) as tally:
            outcome = await shredder.erase_batch(_batch(keys, subjects))
        assert _statuses(outcome) == {"done"}
        counts.append((tally.statements, tally.commits))
    assert counts[0] == counts[1], counts


async def test_one_subject_s_problem_fails_only_that_subject(
    shredder: KeyShredder, keys: KeyService, keys_url: str, settings: Settings
) -> None:
    subjects = _subjects(12)
    sealed = await _seal(keys, subjects)
    batch = _batch(keys, subjects)
    items = list(batch.subjects)
    items[4] = items[4].model_copy(update={"subject_ref": "ab" * 16})  # another subject key's
    items[7] = items[7].model_copy(update={"subject_ref": "not a reference"})
    batch = batch.model_copy(update={"subjects": items})

    outcome = await shredder.erase_batch(batch)

    failed = {i: o for i, o in enumerate(outcome.outcomes) if o.status == "failed"}
    assert set(failed) == {4, 7}
    assert failed[4].detail.startswith("ConfigurationError: this worker's LETHE_SUBJECT_KEY")
    assert "nothing was shredded" in failed[4].detail
    assert failed[7].detail == (
        f"UnsupportedStep: step {batch.step.id}: the subject reference is malformed"
    )
    assert outcome.evidence["subjects_failed"] == 2
    assert subjects[4].subject_id not in repr(outcome)
    fresh = await key_service(keys_url, settings.keys_master_key_bytes, settings.subject_key_bytes)
    for n, subject in enumerate(subjects):
        value = sealed[subject.subject_id]
        if n in (4, 7):  # their keys are untouched
            assert await fresh.decrypt(value, WHERE, cached=False) == subject.subject_id.encode()
        else:
            with pytest.raises(KeyShredded):
                await fresh.decrypt(value, WHERE, cached=False)


class _WorkerLost(BaseException):
    """Stands for the end of the worker's process: nothing after it runs, nothing is caught."""


def _env(attempt: int = 1, details: list[Any] | None = None) -> ActivityEnvironment:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        env.info, task_queue="lethe-eu", attempt=attempt, heartbeat_details=details or []
    )
    return env


async def _lost_after_shredding(
    shredder: KeyShredder, batch: BatchStepRequest, monkeypatch: pytest.MonkeyPatch
) -> list[Any]:
    """A first attempt whose worker is lost right after the batch's transaction; its beats."""
    real = shred._shred_many

    async def then_lost(*args: Any) -> dict[str, int]:
        await real(*args)
        raise _WorkerLost

    beats: list[Any] = []
    env = _env()
    env.on_heartbeat = lambda *details: beats.extend(details)
    with monkeypatch.context() as patched:
        patched.setattr(shred, "_shred_many", then_lost)
        with pytest.raises(_WorkerLost):
            await env.run(shredder.erase_batch, batch)
    return beats


async def test_a_retry_after_a_lost_worker_keeps_the_canary_and_the_counts(
    shredder: KeyShredder, keys: KeyService, monkeypatch: pytest.MonkeyPatch
) -> None:
    subjects = _subjects(20)
    sealed = await _seal(keys, subjects)
    batch = _batch(keys, subjects)

    beats = await _lost_after_shredding(shredder, batch, monkeypatch)
    assert [b["lethe_effect"]["stage"] for b in beats] == ["planned"]
    assert beats[0]["lethe_effect"]["planned"] == {"versions": 20}
    assert isinstance(beats[0]["canary"], str)
    assert [await key_rows(keys, item.subject_ref) for item in batch.subjects] == [[]] * 20

    retry = await _env(2, beats).run(shredder.erase_batch, batch)
    assert _statuses(retry) == {"done"}
    # The key store's records are this request's: each subject's count is exact.
    assert [o.affected for o in retry.outcomes] == [1] * 20
    assert retry.evidence["versions_destroyed"] == 20
    assert retry.evidence["canary"] == beats[0]["canary"]
    assert retry.evidence["canary_decryption"] == "KeyShredded"
    assert "canary kept from an earlier attempt" in retry.detail
    with pytest.raises(KeyShredded):
        await keys.decrypt(sealed[subjects[9].subject_id], WHERE, cached=False)


async def test_a_replay_after_a_restore_retried_says_what_it_cannot_know(
    shredder: KeyShredder, keys: KeyService, monkeypatch: pytest.MonkeyPatch
) -> None:
    subjects = _subjects(8)
    await _seal(keys, subjects)
    erasure = _batch(keys, subjects)
    backup = [row for s in erasure.subjects for row in await key_rows(keys, s.subject_ref)]
    assert _statuses(await shredder.erase_batch(erasure)) == {"done"}
    async with keys.engine.begin() as conn:  # a restore brings the keys back, not the records
        await conn.execute(insert(key_store.data_keys), backup)

    checked = await shredder.verify_batch(erasure, await shredder.erase_batch(erasure))
    assert _statuses(checked) == {"done"}  # the second erase destroyed the restored keys
    async with keys.engine.begin() as conn:
        await conn.execute(insert(key_store.data_keys), backup)
    stale = await shredder.verify_batch(erasure, checked)
    assert _statuses(stale) == {"failed"}
    assert "1 data-key version(s) of the subject are still in the key store" in (
        stale.outcomes[0].detail
    )

    replay = _batch(keys, subjects)  # a forget-list replay: a new request
    beats = await _lost_after_shredding(shredder, replay, monkeypatch)
    assert beats[0]["per_subject"]["planned"] == [1] * 8
    planned = await _env(2, beats).run(shredder.erase_batch, replay)
    assert _statuses(planned) == {"done"}
    # The records are the first erasure's: the replay's counts come from its heartbeats.
    assert [o.affected for o in planned.outcomes] == [1] * 8
    assert planned.evidence["versions_destroyed"] is None  # how many went: not known
    assert planned.evidence["first_attempt_evidence"] == "planned"
    assert "had found 1 version(s)" in planned.outcomes[0].detail
    lost = await _env(2).run(shredder.erase_batch, replay)
    assert lost.evidence["first_attempt_evidence"] == "lost"
    assert "is not known" in lost.outcomes[0].detail


async def test_the_worker_s_activity_shreds_a_batch(
    connectors: Connectors, keys: KeyService, keys_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CONNECTION_VARIABLE, keys_url)
    subjects = _subjects(30)
    sealed = await _seal(keys, subjects)
    batch = _batch(keys, subjects)
    batch = batch.model_copy(
        update={"step": batch.step.model_copy(update={"connection": CONNECTION_VARIABLE})}
    )
    beats: list[Any] = []
    env = _env()
    env.on_heartbeat = lambda *details: beats.extend(details)

    outcome = await env.run(connectors.activity("keys.erase_batch"), batch)

    assert _statuses(outcome) == {"done"}
    assert [o.affected for o in outcome.outcomes] == [1] * 30
    assert [b["lethe_effect"]["stage"] for b in beats] == ["planned", "erased"]
    assert {b["lethe_effect"]["request"] for b in beats} == {f"{batch.request_id}#3"}
    assert beats[0]["canary"] == outcome.evidence["canary"]
    assert beats[-1]["lethe_effect"]["made"] == {"versions_destroyed": 30}
    with pytest.raises(KeyShredded):
        await keys.decrypt(sealed[subjects[29].subject_id], WHERE, cached=False)
