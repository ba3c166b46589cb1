"""The Redis connector's batch purge against the stack's Redis: hundreds of subjects in one pass
per glob template, exact keys without SCAN, hash fields, every other key byte-identical, SCAN
calls that do not grow with the batch, per-subject problems, retries that keep the first
attempt's counts, and the single-subject purge that is the same code with a batch of one."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from redis.asyncio import ConnectionPool, Redis
from temporalio.testing import ActivityEnvironment

from lethe.activities.cache import SCAN_COUNT, UNLINK_GROUP, CacheEraser, glob_escape
from lethe.activities.clients import Clients
from lethe.activities.connectors import Connectors
from lethe.classification.datamap import RedisHashField, RedisLocator
from lethe.contracts import BatchStepOutcome, BatchStepRequest, BulkSubject, Subject
from tests.steps import decision, step

TENANT = "st-mary"
GLOB_IDS = ["*", "?", "[0-9]*", "\\*"]
"""Subject ids with glob characters: each must match only itself."""
DECOY_IDS = ["1", "12", "5", "s1x", "s10x", "*x", "x?", "[", "s"]
"""Subjects outside every batch, with keys that a careless glob would reach."""


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[Redis]:
    """A client of the stack's Redis that reads bytes (for DUMP)."""
    redis = Redis.from_url(redis_url)
    yield redis
    await redis.aclose()


@pytest.fixture
async def prefix(raw: Redis) -> AsyncIterator[str]:
    """A key prefix of this test's own; its keys are removed afterwards."""
    name = f"test-cache-batch:{uuid.uuid4().hex[:10]}"
    yield name
    keys = [key async for key in raw.scan_iter(match=f"{glob_escape(name)}:*", count=1000)]
    for start in range(0, len(keys), 500):
        await raw.unlink(*keys[start : start + 500])


def _locator(prefix: str) -> RedisLocator:
    return RedisLocator(
        patterns=[
            f"{prefix}:patient:{{subject_id}}:*",  # glob after the id
            f"{prefix}:session:{{subject_id}}",  # an exact key: no SCAN
            f"{prefix}:t?:[a-c]*:{{subject_id}}",  # globs before the id: one prefix for all
        ],
        hash_fields=[RedisHashField(key=f"{prefix}:by-email", field="{identity.email}")],
        categories=["user.contact"],
    )


def _email(subject_id: str) -> str:
    return f"{subject_id}@example.org"


async def _seed(raw: Redis, prefix: str, ids: list[str]) -> None:
    """Each subject's keys: four the locator names, one it does not; and its hash field."""
    pipe = raw.pipeline(transaction=False)
    for n, sid in enumerate(ids):
        pipe.set(f"{prefix}:patient:{sid}:profile", f'{{"n": {n}}}')
        pipe.rpush(f"{prefix}:patient:{sid}:visits", "2026-01-02", f"2026-02-{n % 28 + 1:02d}")
        pipe.set(f"{prefix}:session:{sid}", f"token-{n}")
        pipe.hset(f"{prefix}:t1:b-{n}:{sid}", mapping={"n": str(n)})
        pipe.set(f"{prefix}:t1:d-{n}:{sid}", "not named")  # `d` is outside [a-c]
        pipe.hset(f"{prefix}:by-email", _email(sid), sid)
    await pipe.execute()


def _named(prefix: str, sid: str, n: int) -> list[str]:
    return [
        f"{prefix}:patient:{sid}:profile",
        f"{prefix}:patient:{sid}:visits",
        f"{prefix}:session:{sid}",
        f"{prefix}:t1:b-{n}:{sid}",
    ]


async def _dumps(raw: Redis, prefix: str) -> dict[bytes, bytes]:
    """Every key under the prefix (but the shared hash) with its DUMP: type, value and all."""
    keys = [k async for k in raw.scan_iter(match=f"{glob_escape(prefix)}:*", count=1000)]
    keys = [k for k in keys if k != f"{prefix}:by-email".encode()]
    pipe = raw.pipeline(transaction=False)
    for key in keys:
        pipe.dump(key)
    return dict(zip(keys, await pipe.execute(), strict=True))


def _batch(locator: RedisLocator, ids: list[str], *, number: int = 0, email: bool = True) -> Any:
    started = datetime.now(UTC)
    return BatchStepRequest(
        request_id=f"bulk-{uuid.uuid4().hex[:8]}",
        batch=number,
        step=step(locator, action="purge", decisions=[decision("purge", rule="gdpr.cache")]),
        subjects=[
            BulkSubject(
                subject_ref=uuid.uuid4().hex,
                subject=Subject(
                    tenant=TENANT,
                    subject_id=sid,
                    identities={"email": _email(sid)} if email else {},
                ),
            )
            for sid in ids
        ],
        erasure_started_at=started,
        window_ends_at=started + timedelta(days=30),
    )


def _statuses(outcome: BatchStepOutcome) -> set[str]:
    return {o.status for o in outcome.outcomes}


async def test_a_batch_of_hundreds_purges_each_subject_and_nothing_else(
    clients: Clients, redis_url: str, raw: Redis, prefix: str
) -> None:
    ids = [f"s{n}" for n in range(296)] + GLOB_IDS
    await _seed(raw, prefix, ids + DECOY_IDS)
    named = {k.encode() for n, sid in enumerate(ids) for k in _named(prefix, sid, n)}
    before = await _dumps(raw, prefix)
    assert named <= set(before)
    batch = _batch(_locator(prefix), ids)
    eraser = CacheEraser.open(clients, redis_url)

    outcome = await eraser.erase_batch(batch)

    assert [o.subject_ref for o in outcome.outcomes] == [s.subject_ref for s in batch.subjects]
    assert _statuses(outcome) == {"done"}, [o.detail for o in outcome.outcomes][:3]
    assert {o.affected for o in outcome.outcomes} == {5}  # four keys and one hash field each
    evidence = outcome.evidence
    assert (evidence["keys_unlinked"], evidence["hash_fields_removed"]) == (4 * 300, 300)
    assert (evidence["keys_remaining"], evidence["hash_fields_remaining"]) == (0, 0)
    # Every other key, the subjects' own unnamed ones among them, is byte-identical.
    after = await _dumps(raw, prefix)
    assert after == {k: v for k, v in before.items() if k not in named}
    emails = await raw.hgetall(f"{prefix}:by-email")
    assert emails == {_email(sid).encode(): sid.encode() for sid in DECOY_IDS}
    assert not any(sid in repr(outcome) for sid in ("s17", "s295", "@example.org"))

    again = await eraser.erase_batch(batch)
    assert _statuses(again) == {"done"}
    assert {o.affected for o in again.outcomes} == {0}
    assert again.evidence["keys_unlinked"] == 0
    assert await _dumps(raw, prefix) == after


async def test_scan_calls_do_not_grow_with_the_batch(redis_url: str, prefix: str) -> None:
    """Counted by the connector's own client, a Redis client whose SCAN counts its calls. The
    keys live in a database of their own (no other test changes its keyspace), fewer than one
    SCAN page holds, so every pass over it is one call whatever the batch."""
    isolated = urlunsplit(urlsplit(redis_url)._replace(path="/13"))
    own = Redis.from_url(isolated)
    counting = _CountingRedis(connection_pool=ConnectionPool.from_url(isolated))
    try:
        ids = [f"s{n}" for n in range(311)]
        pipe = own.pipeline(transaction=False)
        for n, sid in enumerate(ids):
            pipe.set(f"{prefix}:patient:{sid}:profile", "x")
            pipe.set(f"{prefix}:session:{sid}", "x")
            pipe.set(f"{prefix}:t1:b-{n}:{sid}", "x")
            pipe.hset(f"{prefix}:by-email", _email(sid), sid)
        await pipe.execute()
        assert await own.dbsize() < SCAN_COUNT
        scans = []
        for chunk in (ids[:1], ids[1:11], ids[11:]):
            before = counting.calls
            outcome = await CacheEraser(counting).erase_batch(_batch(_locator(prefix), chunk))
            assert _statuses(outcome) == {"done"}
            assert outcome.evidence["keys_unlinked"] == 3 * len(chunk)
            scans.append(counting.calls - before)
            assert outcome.evidence["scan_calls"] == scans[-1]
        # Two glob templates, each one pass to purge and one to verify: 1, 10 or 300 subjects.
        assert scans == [4, 4, 4]
        assert await own.exists(f"{prefix}:by-email") == 0
    finally:
        keys = [k async for k in own.scan_iter(match=f"{glob_escape(prefix)}:*", count=1000)]
        if keys:
            await own.unlink(*keys)
        await own.aclose()
        await counting.aclose()
        await counting.connection_pool.disconnect()


class _CountingRedis(Redis):
    """The real client; it counts its SCAN calls."""

    calls = 0

    async def scan(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return await super().scan(*args, **kwargs)


async def test_one_subject_s_problem_fails_only_that_subject(
    clients: Clients, redis_url: str, raw: Redis, prefix: str
) -> None:
    ids = [f"s{n}" for n in range(20)]
    await _seed(raw, prefix, ids)
    # No email for s3: its hash-field template does not render. s7's hash key is a string.
    batch = _batch(_locator(prefix), ids)
    subjects = list(batch.subjects)
    subjects[3] = _batch(_locator(prefix), ["s3"], email=False).subjects[0]
    locator = _locator(prefix).model_copy(
        update={
            "hash_fields": [
                *_locator(prefix).hash_fields,
                RedisHashField(key=f"{prefix}:prefs:{{subject_id}}", field="{subject_id}"),
            ]
        }
    )
    await raw.set(f"{prefix}:prefs:s7", "not a hash")
    batch = batch.model_copy(
        update={"subjects": subjects, "step": batch.step.model_copy(update={"locator": locator})}
    )
    kept = {k.encode() for n in (3, 7) for k in _named(prefix, f"s{n}", n)}
    before = await _dumps(raw, prefix)

    outcome = await CacheEraser.open(clients, redis_url).erase_batch(batch)

    failed = {i: o for i, o in enumerate(outcome.outcomes) if o.status == "failed"}
    assert set(failed) == {3, 7}
    assert failed[3].detail.startswith("MissingIdentity: the template needs {identity.email}")
    assert failed[7].detail.startswith("SchemaMismatch: ")
    assert "hash_fields [1] is not a hash" in failed[7].detail
    assert (failed[3].affected, failed[7].affected) == (0, 0)
    assert outcome.evidence["subjects_failed"] == 2
    after = await _dumps(raw, prefix)
    assert {k: before[k] for k in kept} == {k: after[k] for k in kept}  # untouched
    assert set(await raw.hkeys(f"{prefix}:by-email")) == {b"s3@example.org", b"s7@example.org"}


class _WorkerLost(BaseException):
    """Stands for the end of the worker's process: nothing after it runs, nothing is caught."""


class _LostAfterRemoving(CacheEraser):
    async def _remove(self, *args: Any) -> Any:
        await super()._remove(*args)
        raise _WorkerLost


def _env(attempt: int = 1, details: list[Any] | None = None) -> ActivityEnvironment:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        env.info, task_queue="lethe-eu", attempt=attempt, heartbeat_details=details or []
    )
    return env


async def test_a_retry_of_a_batch_keeps_each_subject_s_counts(
    clients: Clients, redis_url: str, raw: Redis, prefix: str
) -> None:
    ids = [f"s{n}" for n in range(30)]
    await _seed(raw, prefix, ids)
    await raw.unlink(f"{prefix}:session:s4")  # s4 has one key less
    batch = _batch(_locator(prefix), ids)

    beats: list[Any] = []
    first = _env()
    first.on_heartbeat = lambda *details: beats.extend(details)
    with pytest.raises(_WorkerLost):
        await first.run(_LostAfterRemoving(clients.redis(redis_url)).erase_batch, batch)
    assert [b["lethe_effect"]["stage"] for b in beats] == ["planned"]
    assert beats[0]["lethe_effect"]["planned"] == {"keys": 119, "hash_fields": 30}
    assert beats[0]["per_subject"]["planned"][4] == [3, 1]
    assert "s4" not in repr(beats) and "@example.org" not in repr(beats)

    # The plan arrived: each subject's affected is what the first attempt was about to remove.
    retry = await _env(2, beats).run(CacheEraser.open(clients, redis_url).erase_batch, batch)
    assert _statuses(retry) == {"done"}
    assert [o.affected for o in retry.outcomes] == [4 if i == 4 else 5 for i in range(30)]
    assert retry.evidence["first_attempt_evidence"] == "planned"
    assert retry.evidence["keys_unlinked"] is None  # not known, not made up
    assert retry.evidence["retry_keys_unlinked"] == 0
    assert "an earlier attempt had found 4 key(s) and 1 hash field(s)" in retry.outcomes[0].detail

    # Nothing arrived: the retry says it cannot know, and reports no made-up count.
    lost = await _env(2).run(CacheEraser.open(clients, redis_url).erase_batch, batch)
    assert lost.evidence["first_attempt_evidence"] == "lost"
    assert "is not known" in lost.outcomes[0].detail

    # A first attempt whose result arrived: its retry reports its per-subject counts.
    await _seed(raw, prefix, ids)
    told: list[Any] = []
    done = _env()
    done.on_heartbeat = lambda *details: told.extend(details)
    erased = await done.run(CacheEraser.open(clients, redis_url).erase_batch, batch)
    assert told[-1]["lethe_effect"]["stage"] == "erased"
    again = await _env(2, told[-1:]).run(CacheEraser.open(clients, redis_url).erase_batch, batch)
    assert again.evidence["first_attempt_evidence"] == "recorded"
    assert [o.affected for o in again.outcomes] == [o.affected for o in erased.outcomes]
    assert {o.affected for o in again.outcomes} == {5}
    assert again.evidence["keys_unlinked"] == erased.evidence["keys_unlinked"] == 120


async def test_verify_batch_finds_what_came_back(
    clients: Clients, redis_url: str, raw: Redis, prefix: str
) -> None:
    ids = [f"s{n}" for n in range(12)]
    await _seed(raw, prefix, ids)
    batch = _batch(_locator(prefix), ids)
    eraser = CacheEraser.open(clients, redis_url)
    erased = await eraser.erase_batch(batch)
    assert _statuses(erased) == {"done"}

    await raw.set(f"{prefix}:patient:s5:profile", "back from a stale replica")
    await raw.hset(f"{prefix}:by-email", _email("s9"), "s9")
    checked = await eraser.verify_batch(batch, erased)

    failed = {i: o.detail for i, o in enumerate(checked.outcomes) if o.status == "failed"}
    assert set(failed) == {5, 9}
    assert "1 key(s) still match the patterns and 0 hash field(s)" in failed[5]
    assert "0 key(s) still match the patterns and 1 hash field(s)" in failed[9]
    assert [o.affected for o in checked.outcomes] == [o.affected for o in erased.outcomes]
    assert (checked.evidence["keys_remaining"], checked.evidence["hash_fields_remaining"]) == (
        1,
        1,
    )


async def test_the_worker_s_activity_erases_a_batch(
    connectors: Connectors, raw: Redis, prefix: str
) -> None:
    ids = [f"s{n}" for n in range(40)] + GLOB_IDS
    await _seed(raw, prefix, ids + DECOY_IDS)
    before = await _dumps(raw, prefix)
    batch = _batch(_locator(prefix), ids)

    beats: list[Any] = []
    env = _env()
    env.on_heartbeat = lambda *details: beats.extend(details)
    outcome = await env.run(connectors.activity("redis.erase_batch"), batch)

    assert _statuses(outcome) == {"done"}
    assert {o.affected for o in outcome.outcomes} == {5}
    # One journal for the batch: its plan, then what it removed.
    assert [b["lethe_effect"]["stage"] for b in beats] == ["planned", "erased"]
    assert {b["lethe_effect"]["request"] for b in beats} == {f"{batch.request_id}#0"}
    assert beats[-1]["lethe_effect"]["made"] == {
        "keys_unlinked": 4 * 44,
        "hash_fields_removed": 44,
    }
    named = {k.encode() for n, sid in enumerate(ids) for k in _named(prefix, sid, n)}
    assert await _dumps(raw, prefix) == {k: v for k, v in before.items() if k not in named}


async def test_the_batch_matches_keys_exactly_as_redis_does(
    clients: Clients, redis_url: str, raw: Redis, prefix: str
) -> None:
    """The same keys under two prefixes: one purged as a batch (matched here), the other one
    subject at a time (SCAN MATCH with each subject's own pattern: Redis matches). What is
    left must be the same, for globs with classes, negation, ranges either way and escapes."""

    def locator(under: str) -> RedisLocator:
        return RedisLocator(
            patterns=[
                f"{under}:a:[^x]?:{{subject_id}}*",
                f"{under}:b:*[0-9z-w]:{{subject_id}}",
                f"{under}:c:\\[{{subject_id}}\\]?",
            ],
            categories=["user.contact"],
        )

    ids = ["s1", "s2", "*", "?", "[0-9]", "\\", "s1*", "-"]
    decoys = ["s10", "s", "x", "5", "[", "]"]
    relative = [
        f"{shape}:{sid}{tail}"
        for sid in ids + decoys
        for shape in [f"a:{c1}{c2}" for c1 in "xay^" for c2 in "1?*"]
        + [f"b:{mid}{last}" for mid in ("", "q", "q5") for last in "5wxz-y"]
        for tail in ("", "0", ":k")
    ] + [f"c:[{sid}]{tail}" for sid in ids + decoys for tail in ("", "!", "!!")]
    batched, single = f"{prefix}:batched", f"{prefix}:single"
    pipe = raw.pipeline(transaction=False)
    for key in relative:
        pipe.set(f"{batched}:{key}", "v")
        pipe.set(f"{single}:{key}", "v")
    await pipe.execute()
    eraser = CacheEraser.open(clients, redis_url)

    outcome = await eraser.erase_batch(_batch(locator(batched), ids))
    for item in _batch(locator(single), ids).subjects:
        await eraser.erase(_batch(locator(single), [item.subject.subject_id]).single(item))

    async def left(under: str) -> set[bytes]:
        found = raw.scan_iter(match=f"{glob_escape(under)}:*", count=1000)
        return {key[len(under) + 1 :] async for key in found}

    assert _statuses(outcome) == {"done"}
    kept = await left(batched)
    assert kept == await left(single)
    assert 0 < len(kept) < len(set(relative))
    assert outcome.evidence["keys_unlinked"] == len(set(relative)) - len(kept)


async def test_keys_subjects_share_count_for_each_and_many_own_keys_count_exactly(
    clients: Clients, redis_url: str, raw: Redis, prefix: str
) -> None:
    """One UNLINK answers for a subject's own keys together (at most UNLINK_GROUP a command);
    a key several subjects' globs match is unlinked alone and counted for each of them."""
    locator = RedisLocator(patterns=[f"{prefix}:g:*{{subject_id}}*"], categories=["user.contact"])
    own_a = [f"{prefix}:g:a{n}" for n in range(2 * UNLINK_GROUP + 7)]
    own_b = [f"{prefix}:g:b1", f"{prefix}:g:xb"]
    shared = [f"{prefix}:g:ab", f"{prefix}:g:ba", f"{prefix}:g:xaxb"]
    await raw.mset(dict.fromkeys([*own_a, *own_b, *shared, f"{prefix}:g:c1"], "v"))

    outcome = await CacheEraser.open(clients, redis_url).erase_batch(
        _batch(locator, ["a", "b"], email=False)
    )

    assert _statuses(outcome) == {"done"}
    assert [o.affected for o in outcome.outcomes] == [len(own_a) + 3, len(own_b) + 3]
    assert f"unlinked {len(own_a) + 3} key(s)" in outcome.outcomes[0].detail
    # The batch's total counts each key once.
    assert outcome.evidence["keys_unlinked"] == len(own_a) + len(own_b) + len(shared)
    left = {k async for k in raw.scan_iter(match=f"{glob_escape(prefix)}:g:*", count=1000)}
    assert left == {f"{prefix}:g:c1".encode()}
