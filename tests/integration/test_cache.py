"""The Redis connector against the stack's Redis: purge, verify, glob-safe ids, bad input,
and the preflight (templates, hash keys, credentials, ACL) that touches nothing."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from redis.asyncio import Redis
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from lethe.activities.cache import CacheEraser, glob_escape
from lethe.activities.clients import Clients
from lethe.activities.common import SchemaMismatch
from lethe.activities.connector import UnsupportedStep, erase_and_verify
from lethe.activities.connectors import Connectors
from lethe.classification.datamap import MissingIdentity, RedisHashField, RedisLocator
from lethe.contracts import Action, StepOutcome, StepRequest, Subject
from lethe.kernel.errors import ServiceUnavailable
from tests.steps import decision, step, step_request

REF = "0" * 32
SUBJECTS = {"1": "one@example.org", "12": "twelve@example.org"}


@pytest.fixture
async def prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix of this test's own; its keys are removed afterwards."""
    name = f"test-cache:{uuid.uuid4().hex[:10]}"
    yield name
    client = Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{glob_escape(name)}:*")]
        if keys:
            await client.unlink(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    """A client of the stack's Redis for seeding and checking, apart from the connector's."""
    redis = Redis.from_url(redis_url, decode_responses=True)
    yield redis
    await redis.aclose()


def _locator(prefix: str) -> RedisLocator:
    return RedisLocator(
        patterns=[f"{prefix}:patient:{{subject_id}}:*", f"{prefix}:session:{{subject_id}}"],
        hash_fields=[RedisHashField(key=f"{prefix}:patients:by-email", field="{identity.email}")],
        categories=["user.contact", "user.account"],
    )


def _request(
    locator: RedisLocator, subject_id: str, email: str | None, action: Action = "purge"
) -> StepRequest:
    identities = {"email": email} if email is not None else {}
    reason = decision(
        action,
        rule="hipaa.audit-trail" if action == "retain" else "gdpr.cache.purge",
        citation="45 CFR 164.316(b)(2)" if action == "retain" else "GDPR Art. 17(1)",
        exception="Art. 17(3)(b) legal obligation" if action == "retain" else None,
    )
    return step_request(
        step(locator, action=action, decisions=[reason]),
        subject=Subject(tenant="st-mary", subject_id=subject_id, identities=identities),
        subject_ref=REF,
    )


async def _seed(client: Redis, prefix: str, subject_id: str, email: str) -> list[str]:
    keys = [
        f"{prefix}:patient:{subject_id}:profile",
        f"{prefix}:patient:{subject_id}:visits",
        f"{prefix}:session:{subject_id}",
    ]
    await client.set(keys[0], '{"name": "someone"}')
    await client.rpush(keys[1], "2026-01-02", "2026-02-03")
    await client.set(keys[2], "token")
    await client.hset(f"{prefix}:patients:by-email", email, subject_id)
    return keys


async def _existing(client: Redis, keys: list[str]) -> list[str]:
    return [key for key in keys if await client.exists(key)]


async def test_purge_removes_one_subject_and_leaves_the_other(
    clients: Clients, redis_url: str, client: Redis, prefix: str
) -> None:
    seeded = {sid: await _seed(client, prefix, sid, email) for sid, email in SUBJECTS.items()}
    locator = _locator(prefix)
    request = _request(locator, "1", SUBJECTS["1"])
    eraser = CacheEraser.open(clients, redis_url)

    erased = await eraser.erase(request)

    assert erased.status == "running"
    assert erased.affected == 4  # three keys and one hash field
    assert erased.evidence == {
        "patterns": 2,
        "hash_fields": 1,
        "keys_unlinked": 3,
        "hash_fields_removed": 1,
    }
    assert await _existing(client, seeded["1"]) == []
    # "12" starts with "1": the pattern's separator keeps subject 12's keys out of reach.
    assert await _existing(client, seeded["12"]) == seeded["12"]
    assert await client.hgetall(f"{prefix}:patients:by-email") == {SUBJECTS["12"]: "12"}

    verified = await eraser.verify(request, erased)
    assert verified.status == "done"
    assert verified.verified
    assert verified.evidence["keys_remaining"] == 0
    assert verified.evidence["hash_fields_remaining"] == 0


async def test_erasing_twice_is_harmless_and_reports_nothing_new(
    clients: Clients, redis_url: str, client: Redis, prefix: str
) -> None:
    await _seed(client, prefix, "1", SUBJECTS["1"])
    other = await _seed(client, prefix, "12", SUBJECTS["12"])
    request = _request(_locator(prefix), "1", SUBJECTS["1"])
    eraser = CacheEraser.open(clients, redis_url)

    first = await eraser.erase(request)
    second = await eraser.erase(request)

    assert (first.status, first.affected) == ("running", 4)
    assert (second.status, second.affected) == ("running", 0)
    assert (await eraser.verify(request, second)).status == "done"
    assert await _existing(client, other) == other


class _WorkerLost(BaseException):
    """Stands for the end of the worker's process: nothing after it runs, nothing is caught."""


class _LostAfterRemoving(CacheEraser):
    """Loses its worker right after the effect, before the activity can answer."""

    async def _remove(self, *args: Any) -> tuple[int, int]:
        await super()._remove(*args)
        raise _WorkerLost


def _env(attempt: int = 1, heartbeat_details: list[Any] | None = None) -> ActivityEnvironment:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        env.info, task_queue="lethe-eu", attempt=attempt, heartbeat_details=heartbeat_details or []
    )
    return env


async def _lost_first_attempt(clients: Clients, redis_url: str, request: StepRequest) -> list[Any]:
    """Run a first attempt whose worker is lost right after the effect; its heartbeats."""
    beats: list[Any] = []
    env = _env()
    env.on_heartbeat = lambda *details: beats.extend(details)
    with pytest.raises(_WorkerLost):
        await env.run(_LostAfterRemoving(clients.redis(redis_url)).erase, request)
    return beats


async def test_a_retry_after_a_lost_worker_reports_what_the_first_attempt_found(
    clients: Clients, redis_url: str, client: Redis, prefix: str
) -> None:
    seeded = await _seed(client, prefix, "1", SUBJECTS["1"])
    other = await _seed(client, prefix, "12", SUBJECTS["12"])
    request = _request(_locator(prefix), "1", SUBJECTS["1"])
    beats = await _lost_first_attempt(clients, redis_url, request)
    # The plan went out before the effect (and nothing after it: the worker was lost).
    assert [b["lethe_effect"]["stage"] for b in beats] == ["planned"]
    assert beats[0]["lethe_effect"]["planned"] == {"keys": 3, "hash_fields": 1}
    assert SUBJECTS["1"] not in repr(beats) and ":1:" not in repr(beats)
    assert await _existing(client, seeded) == []

    outcome = await _env(attempt=2, heartbeat_details=beats).run(
        erase_and_verify, CacheEraser.open(clients, redis_url), request
    )
    assert outcome.status == "done", outcome.detail
    assert outcome.affected == 4  # what the first attempt found, now gone
    evidence = outcome.evidence
    # How many the first attempt's UNLINK removed never arrived: not known, not made up.
    assert evidence["keys_unlinked"] is None
    assert evidence["hash_fields_removed"] is None
    assert evidence["first_attempt_evidence"] == "planned"
    assert evidence["earlier_found_keys"] == 3
    assert evidence["earlier_found_hash_fields"] == 1
    assert evidence["retry_keys_unlinked"] == 0
    assert evidence["retry_hash_fields_removed"] == 0
    assert evidence["keys_remaining"] == 0
    assert "had found 3 key(s) and 1 hash field(s)" in outcome.detail
    assert await _existing(client, other) == other


async def test_the_plan_counts_only_what_exists(
    clients: Clients, redis_url: str, client: Redis, prefix: str
) -> None:
    seeded = await _seed(client, prefix, "1", SUBJECTS["1"])
    await client.delete(seeded[2])  # the session key, which a literal pattern names
    request = _request(_locator(prefix), "1", SUBJECTS["1"])
    beats: list[Any] = []
    env = _env()
    env.on_heartbeat = lambda *details: beats.extend(details)
    erased = await env.run(CacheEraser.open(clients, redis_url).erase, request)
    assert beats[0]["lethe_effect"]["planned"] == {"keys": 2, "hash_fields": 1}
    assert (erased.affected, erased.evidence["keys_unlinked"]) == (3, 2)


async def test_a_retry_without_any_heartbeat_says_the_first_attempt_s_counts_are_lost(
    clients: Clients, redis_url: str, client: Redis, prefix: str
) -> None:
    await _seed(client, prefix, "1", SUBJECTS["1"])
    request = _request(_locator(prefix), "1", SUBJECTS["1"])
    await _lost_first_attempt(clients, redis_url, request)

    outcome = await _env(attempt=2).run(
        erase_and_verify, CacheEraser.open(clients, redis_url), request
    )
    assert outcome.status == "done", outcome.detail
    assert outcome.evidence["first_attempt_evidence"] == "lost"
    assert outcome.evidence["keys_unlinked"] is None
    assert outcome.evidence["retry_keys_unlinked"] == 0
    assert outcome.affected == 0
    assert "no heartbeat of an earlier attempt arrived" in outcome.detail


async def test_a_retry_counts_what_recorded_attempts_removed(
    connectors: Connectors,
    clients: Clients,
    redis_url: str,
    client: Redis,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await _seed(client, prefix, "1", SUBJECTS["1"])
    request = _request(_locator(prefix), "1", SUBJECTS["1"])
    beats: list[Any] = []
    first = _env()
    first.on_heartbeat = lambda *details: beats.extend(details)
    erased = await first.run(CacheEraser.open(clients, redis_url).erase, request)
    assert erased.evidence["keys_unlinked"] == 3
    assert beats[-1]["lethe_effect"]["stage"] == "erased"  # then the worker is lost verifying

    # Its erase's last heartbeat arrived: the retry reports the first attempt's counts.
    again = await _env(attempt=2, heartbeat_details=beats[-1:]).run(
        erase_and_verify, CacheEraser.open(clients, redis_url), request
    )
    assert again.status == "done"
    assert (again.affected, again.evidence["keys_unlinked"]) == (4, 3)
    assert again.evidence["hash_fields_removed"] == 1
    assert again.evidence["first_attempt_evidence"] == "recorded"

    # An attempt that failed before its effect says so, and the retry's counts are exact.
    await _seed(client, prefix, "1", SUBJECTS["1"])
    later = request.model_copy(update={"request_id": "req-2"})
    failing = _env()
    told: list[Any] = []
    failing.on_heartbeat = lambda *details: told.extend(details)
    monkeypatch.setenv("LETHE_STACK_REDIS_URL", "redis://127.0.0.1:1/0")
    with pytest.raises(ApplicationError, match="ConnectionError"):
        await failing.run(connectors.activity("redis.erase"), later)
    assert [b["lethe_effect"]["stage"] for b in told] == ["started"]
    monkeypatch.setenv("LETHE_STACK_REDIS_URL", redis_url)
    retried = await _env(attempt=2, heartbeat_details=told).run(
        connectors.activity("redis.erase"), later
    )
    assert retried.status == "done"
    assert retried.evidence["first_attempt_evidence"] == "recorded"
    assert (retried.affected, retried.evidence["keys_unlinked"]) == (4, 3)
    assert retried.evidence["retry_keys_unlinked"] == 3


@pytest.mark.parametrize("subject_id", ["*", "?", "[0-9]*", "1*", "\\*", "["])
async def test_glob_characters_in_a_subject_id_match_only_that_subject(
    clients: Clients, redis_url: str, client: Redis, prefix: str, subject_id: str
) -> None:
    target = await _seed(client, prefix, subject_id, "glob@example.org")
    others = {sid: await _seed(client, prefix, sid, email) for sid, email in SUBJECTS.items()}
    request = _request(_locator(prefix), subject_id, "glob@example.org")
    eraser = CacheEraser.open(clients, redis_url)

    erased = await eraser.erase(request)

    assert erased.affected == 4
    assert await _existing(client, target) == []
    for sid, keys in others.items():
        assert await _existing(client, keys) == keys, sid
    assert set(await client.hkeys(f"{prefix}:patients:by-email")) == set(SUBJECTS.values())
    assert (await eraser.verify(request, erased)).status == "done"


async def test_many_keys_are_scanned_and_unlinked_in_batches(
    clients: Clients, redis_url: str, client: Redis, prefix: str
) -> None:
    pipe = client.pipeline(transaction=False)
    for n in range(2500):
        pipe.set(f"{prefix}:patient:1:visit:{n}", "x")
        pipe.set(f"{prefix}:patient:12:visit:{n}", "y")
    await pipe.execute()
    request = _request(_locator(prefix), "1", SUBJECTS["1"])
    eraser = CacheEraser.open(clients, redis_url)

    erased = await eraser.erase(request)

    assert erased.evidence["keys_unlinked"] == 2500
    left = [k async for k in client.scan_iter(match=f"{prefix}:patient:1:*", count=1000)]
    assert left == []
    kept = [k async for k in client.scan_iter(match=f"{prefix}:patient:12:*", count=1000)]
    assert len(kept) == 2500
    assert (await eraser.verify(request, erased)).status == "done"


async def test_a_retain_step_is_refused_and_changes_nothing(
    clients: Clients, redis_url: str, client: Redis, prefix: str
) -> None:
    """The regional workflow records retain steps itself: a connector given one refuses it."""
    keys = await _seed(client, prefix, "1", SUBJECTS["1"])
    request = _request(_locator(prefix), "1", SUBJECTS["1"], action="retain")
    eraser = CacheEraser.open(clients, redis_url)

    with pytest.raises(UnsupportedStep, match="kept by policy"):
        await eraser.erase(request)

    assert await _existing(client, keys) == keys
    assert await client.hget(f"{prefix}:patients:by-email", SUBJECTS["1"]) == "1"


async def test_verify_fails_while_the_subject_s_data_remains(
    clients: Clients, redis_url: str, client: Redis, prefix: str
) -> None:
    await _seed(client, prefix, "1", SUBJECTS["1"])
    request = _request(_locator(prefix), "1", SUBJECTS["1"])
    eraser = CacheEraser.open(clients, redis_url)
    not_erased = StepOutcome(step_id=request.step.id, status="running")

    verified = await eraser.verify(request, not_erased)

    assert verified.status == "failed"
    assert verified.verified
    assert verified.evidence["keys_remaining"] == 3
    assert verified.evidence["hash_fields_remaining"] == 1
    assert "3 key(s)" in verified.detail


async def test_a_missing_identity_destroys_nothing(
    clients: Clients, redis_url: str, client: Redis, prefix: str
) -> None:
    keys = await _seed(client, prefix, "1", SUBJECTS["1"])
    request = _request(_locator(prefix), "1", email=None)

    with pytest.raises(MissingIdentity, match=r"\{identity.email\}"):
        await CacheEraser.open(clients, redis_url).erase(request)

    assert await _existing(client, keys) == keys


async def test_a_hash_field_on_a_key_that_is_not_a_hash_is_a_schema_mismatch(
    clients: Clients, redis_url: str, client: Redis, prefix: str
) -> None:
    keys = await _seed(client, prefix, "1", SUBJECTS["1"])
    await client.delete(f"{prefix}:patients:by-email")
    await client.set(f"{prefix}:patients:by-email", "not a hash")
    request = _request(_locator(prefix), "1", SUBJECTS["1"])

    with pytest.raises(SchemaMismatch, match=r"hash_fields \[0\] is not a hash"):
        await CacheEraser.open(clients, redis_url).erase(request)

    assert await _existing(client, keys) == keys


async def test_an_unreachable_redis_is_retryable_and_names_no_key(
    clients: Clients, prefix: str
) -> None:
    request = _request(_locator(prefix), "secret-subject-7", "secret@example.org")

    with pytest.raises(ServiceUnavailable) as raised:
        await CacheEraser.open(clients, "redis://127.0.0.1:1/0").erase(request)

    assert raised.value.retryable
    assert str(raised.value) == "Redis at 127.0.0.1:1 did not answer (ConnectionError)"
    assert raised.value.__cause__ is None
    assert raised.value.__suppress_context__


# --- preflight -------------------------------------------------------------------------------


async def _state(client: Redis, prefix: str) -> dict[str, tuple[str, object, int]]:
    """Every key under the test's prefix with its type, value and TTL (in whole minutes, begun:
    a second's rounding between two reads on a slow machine is not a change): what a preflight
    must leave exactly as it found it."""
    state: dict[str, tuple[str, object, int]] = {}
    async for key in client.scan_iter(match=f"{glob_escape(prefix)}:*"):
        kind = str(await client.type(key))
        value: object
        if kind == "string":
            value = await client.get(key)
        elif kind == "list":
            value = await client.lrange(key, 0, -1)
        else:
            value = await client.hgetall(key)
        ttl = int(await client.pttl(key))
        state[str(key)] = (kind, value, ttl if ttl < 0 else -(-ttl // 60_000))
    return state


def _redis_url(base: str, user: str, password: str) -> str:
    parts = urlsplit(base)
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{parts.hostname}:{parts.port}"))


MakeUser = Callable[[list[str], list[str]], Awaitable[str]]


@pytest.fixture
async def acl_user(client: Redis) -> AsyncIterator[MakeUser]:
    """Makes ACL users of this test's own, with +@all but for `commands`, on `keys` (name and
    password `<name>-pw` random); deleted afterwards."""
    made: list[str] = []

    async def make(keys: list[str], commands: list[str]) -> str:
        name = f"lethe-test-{uuid.uuid4().hex[:10]}"
        made.append(name)
        await client.acl_setuser(
            name,
            enabled=True,
            passwords=[f"+{name}-pw"],
            keys=keys,
            categories=["+@all"],
            commands=commands,
        )
        return name

    yield make
    if made:
        await client.acl_deluser(*made)


async def test_preflight_passes_for_a_good_locator_and_changes_nothing(
    clients: Clients, redis_url: str, client: Redis, prefix: str
) -> None:
    await _seed(client, prefix, "1", SUBJECTS["1"])
    await client.expire(f"{prefix}:session:1", 600)
    before = await _state(client, prefix)
    eraser = CacheEraser.open(clients, redis_url)

    assert await eraser.preflight(_request(_locator(prefix), "1", SUBJECTS["1"])) == []
    # A hash_fields key that does not exist yet is fine: there is nothing to purge.
    empty = _locator(f"{prefix}:nothing-here")
    assert await eraser.preflight(_request(empty, "1", SUBJECTS["1"])) == []

    assert await _state(client, prefix) == before


async def test_preflight_names_missing_identities_and_a_key_that_is_not_a_hash(
    clients: Clients, redis_url: str, client: Redis, prefix: str
) -> None:
    await _seed(client, prefix, "1", SUBJECTS["1"])
    await client.delete(f"{prefix}:patients:by-email")
    await client.set(f"{prefix}:patients:by-email", "not a hash")
    before = await _state(client, prefix)
    eraser = CacheEraser.open(clients, redis_url)

    wrong_kind = await eraser.preflight(_request(_locator(prefix), "1", SUBJECTS["1"]))
    assert wrong_kind == [
        "Redis system 'session-cache': the key of hash_fields 0 is not a hash (it holds a string)"
    ]

    by_email = RedisLocator(
        patterns=[f"{prefix}:patient:{{subject_id}}:*", f"{prefix}:login:{{identity.email}}"],
        hash_fields=[RedisHashField(key=f"{prefix}:patients:by-email", field="{identity.email}")],
        categories=["user.contact"],
    )
    missing = await eraser.preflight(_request(by_email, "secret-subject-1", email=None))
    assert missing == [
        "Redis system 'session-cache': pattern 1: the template needs {identity.email}, which "
        "the request does not give",
        "Redis system 'session-cache': hash_fields 0: the template needs {identity.email}, "
        "which the request does not give",
    ]
    assert "secret-subject-1" not in repr(wrong_kind + missing)
    assert SUBJECTS["1"] not in repr(wrong_kind + missing)
    assert await _state(client, prefix) == before


async def test_preflight_reports_what_the_acl_denies_the_connection_s_user(
    clients: Clients, redis_url: str, client: Redis, prefix: str, acl_user: MakeUser
) -> None:
    await _seed(client, prefix, "1", SUBJECTS["1"])
    before = await _state(client, prefix)
    # May read and write the patient and session keys, but not UNLINK, and not touch the hash.
    limited = await acl_user([f"{prefix}:patient:*", f"{prefix}:session:*"], ["-unlink"])
    eraser = CacheEraser.open(clients, _redis_url(redis_url, limited, f"{limited}-pw"))

    problems = await eraser.preflight(_request(_locator(prefix), "1", SUBJECTS["1"]))

    denied = f"Redis system 'session-cache': the ACL of user '{limited}' does not allow"
    assert problems == [
        "Redis system 'session-cache': TYPE of the key of hash_fields 0 was refused "
        "(NoPermissionError)",
        f"{denied} UNLINK on the keys of pattern 0",
        f"{denied} UNLINK on the keys of pattern 1",
        f"{denied} HDEL on the key of hash_fields 0",
        f"{denied} HEXISTS on the key of hash_fields 0",
    ]
    assert SUBJECTS["1"] not in repr(problems)
    assert await _state(client, prefix) == before


async def test_preflight_without_the_acl_command_is_not_a_problem_but_bad_credentials_are(
    clients: Clients, redis_url: str, client: Redis, prefix: str, acl_user: MakeUser
) -> None:
    await _seed(client, prefix, "1", SUBJECTS["1"])
    before = await _state(client, prefix)
    # Everything the step runs, but not ACL: the server cannot be asked, which is no problem.
    plain = await acl_user([f"{prefix}:*"], ["-acl"])
    request = _request(_locator(prefix), "1", SUBJECTS["1"])

    url = _redis_url(redis_url, plain, f"{plain}-pw")
    assert await CacheEraser.open(clients, url).preflight(request) == []

    wrong = _redis_url(redis_url, plain, "not-the-password")
    refused = await CacheEraser.open(clients, wrong).preflight(request)
    assert refused == [
        f"Redis system 'session-cache' at {urlsplit(redis_url).netloc} refused the credentials"
    ]
    assert "not-the-password" not in repr(refused)
    assert await _state(client, prefix) == before


async def test_preflight_of_an_unreachable_redis_is_quick_and_transient(
    connectors: Connectors, clients: Clients, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    request = _request(_locator(prefix), "secret-subject-7", "secret@example.org")
    eraser = CacheEraser.open(clients, "redis://127.0.0.1:1/0")

    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as raised:
        await eraser.preflight(request)
    assert time.monotonic() - started < 5
    assert str(raised.value) == "Redis at 127.0.0.1:1 did not answer (ConnectionError)"

    # As the activity: a StepCheck, transient, naming no key; a retain step asks nothing.
    monkeypatch.setenv("LETHE_STACK_REDIS_URL", "redis://127.0.0.1:1/0")
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, task_queue="lethe-eu")
    check = await env.run(connectors.activity("redis.preflight"), request)
    assert check.step_id == "session-cache/0"
    assert check.transient
    assert not check.ready
    assert check.problems == [
        "ServiceUnavailable: Redis at 127.0.0.1:1 did not answer (ConnectionError)"
    ]
    retained = _request(_locator(prefix), "secret-subject-7", None, action="retain")
    refused = await env.run(connectors.activity("redis.preflight"), retained)
    assert not refused.transient
    assert refused.problems[0].startswith("UnsupportedStep: ")
