"""The Redis retention sweep against the stack's Redis: keys under a locator's patterns must carry
a TTL within the limit (and none shorter than an obligation); drift reported per pattern, and
with `apply` TTLs set (checked with PTTL). Tasks come from `plan_sweep` over a small data map and
pack; the sweep runs as the `redis.sweep` activity of a worker in region eu, page by page.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from redis.asyncio import Redis
from temporalio.exceptions import ApplicationError

from lethe.activities.cache_retention import owner, targets
from lethe.activities.connectors import Connectors
from lethe.classification.datamap import RedisLocator
from lethe.contracts import Drift, SweepResult, SweepTask
from tests.sweeps import hold, planned_task, subject_hold, sweep_all, sweep_batch, sweep_once

from .test_cache import client, prefix

__all__ = ["client", "prefix"]  # fixtures, shared with test_cache.py

DAY = 86_400
DAY_MS = DAY * 1000
LIMIT_MS = 90 * DAY_MS
NOW = datetime(2026, 12, 7, tzinfo=UTC)
RULES = [
    {
        "id": "test.contact.storage-limit",
        "category": "user.contact",
        "kind": "limit",
        "period": "90d",
        "citation": "GDPR Art. 5(1)(e)",
    },
    {
        "id": "test.financial.audit-trail",
        "category": "user.financial",
        "kind": "obligation",
        "period": "365d",
        "citation": "a year's bookkeeping obligation",
    },
]


def _task(keys: dict[str, Any]) -> SweepTask:
    """The one sweep task of a map with one Redis locator (`keys`) under the rules above."""
    return planned_task({"name": "session-cache", "kind": "redis", "keys": [keys]}, RULES)


def _sessions(prefix: str, category: str = "user.contact") -> SweepTask:
    return _task({"patterns": [f"{prefix}:session:{{subject_id}}:*"], "categories": [category]})


async def _sweep(
    connectors: Connectors, task: SweepTask, *, batch_size: int = 1000, **options: Any
) -> tuple[list[SweepResult], dict[tuple[str, str], Drift]]:
    """Every call until done, and their drift summed by target and problem (as the workflow)."""
    batch = sweep_batch(task, NOW, batch_size=batch_size, **options)
    results = await sweep_all(connectors, batch, most=1000)
    summed: dict[tuple[str, str], Drift] = {}
    for result in results:
        assert result.removed == 0 and result.samples == []
        for drift in result.drift:
            key = (drift.target, drift.breaks)
            if key in summed:
                old = summed[key]
                drift = old.model_copy(
                    update={"count": old.count + drift.count, "fixed": old.fixed and drift.fixed}
                )
            summed[key] = drift
    return results, summed


async def _seed(client: Redis, prefix: str) -> dict[str, list[str]]:
    """Sessions of subjects 1-3: three without TTL, two kept a year, two within 90 days."""
    keys: dict[str, list[str]] = {"none": [], "long": [], "good": []}
    for n, kind in enumerate(["none", "none", "none", "long", "long", "good", "good"]):
        key = f"{prefix}:session:{n % 3 + 1}:{n}"
        await client.set(key, "token")
        if kind == "long":
            await client.expire(key, 365 * DAY)
        elif kind == "good":
            await client.expire(key, 30 * DAY)
        keys[kind].append(key)
    return keys


async def _ttls(client: Redis, keys: list[str]) -> list[int]:
    return [int(await client.pttl(key)) for key in keys]


def _by_found(drift: dict[tuple[str, str], Drift]) -> dict[str, tuple[int, bool]]:
    return {d.found: (d.count, d.fixed) for d in drift.values()}


async def test_keys_without_a_ttl_or_with_a_long_one_are_reported_then_given_one_by_apply(
    connectors: Connectors, client: Redis, prefix: str
) -> None:
    keys = await _seed(client, prefix)
    task = _sessions(prefix)
    good_before = await _ttls(client, keys["good"])

    _, reported = await _sweep(connectors, task)
    _, dry = await _sweep(connectors, task, apply=True, dry_run=True)

    long_ttl = "TTL > 7776000s (90d)"
    for drift in (reported, dry):
        assert _by_found(drift) == {"no TTL": (3, False), long_ttl: (2, False)}
        assert {d.target for d in drift.values()} == {f"{prefix}:session:{{subject_id}}:*"}
        assert {d.setting for d in drift.values()} == {"ttl"}
        assert {d.wanted for d in drift.values()} == {"TTL <= 7776000s (90d)"}
    breaks = {d.found: d.breaks for d in reported.values()}
    assert breaks["no TTL"] == "test.contact.storage-limit: keys kept for ever, with no TTL"
    assert breaks[long_ttl] == "test.contact.storage-limit: keys kept longer than 7776000s (90d)"
    assert await _ttls(client, keys["none"]) == [-1, -1, -1]  # neither changed anything
    assert all(ttl > 300 * DAY_MS for ttl in await _ttls(client, keys["long"]))

    _, applied = await _sweep(connectors, task, apply=True)

    assert _by_found(applied) == {"no TTL": (3, True), long_ttl: (2, True)}
    for ttl in await _ttls(client, keys["none"] + keys["long"]):
        assert LIMIT_MS - 60_000 < ttl <= LIMIT_MS
    good_after = await _ttls(client, keys["good"])
    assert all(
        0 <= before - after < 60_000 for before, after in zip(good_before, good_after, strict=True)
    )
    _, again = await _sweep(connectors, task, apply=True)
    assert again == {}


async def test_a_sweep_pages_over_more_keys_than_one_batch(
    connectors: Connectors, client: Redis, prefix: str
) -> None:
    keys = [f"{prefix}:session:{n}:k" for n in range(60)]
    for key in keys:
        await client.set(key, "x")
    task = _sessions(prefix)

    results, applied = await _sweep(connectors, task, batch_size=7, apply=True)

    assert len(results) >= 60 // 7
    for result in results[:-1]:
        assert not result.done and isinstance(result.cursor, list) and len(result.cursor) == 2
        assert sum(d.count for d in result.drift) <= 7 + 5  # a SCAN page may hold a few more
    assert results[-1].done and results[-1].cursor is None
    [drift] = applied.values()
    assert (drift.found, drift.count, drift.fixed) == ("no TTL", 60, True)
    assert all(0 < ttl <= LIMIT_MS for ttl in await _ttls(client, keys))


async def test_keys_too_short_for_an_obligation_are_reported_never_changed(
    connectors: Connectors, client: Redis, prefix: str
) -> None:
    short, kept, forever = (f"{prefix}:session:1:{n}" for n in ("short", "kept", "forever"))
    await client.set(short, "x", ex=DAY)
    await client.set(kept, "x", ex=400 * DAY)
    await client.set(forever, "x")
    task = _sessions(prefix, "user.financial")

    _, applied = await _sweep(connectors, task, apply=True)

    [drift] = applied.values()
    assert (drift.found, drift.wanted, drift.count, drift.fixed) == (
        "TTL < 31536000s (365d)",
        "TTL >= 31536000s (365d)",
        1,
        False,
    )
    assert drift.breaks == "test.financial.audit-trail: keys expire before the 1y they must be kept"
    assert DAY_MS - 60_000 < int(await client.pttl(short)) <= DAY_MS
    assert int(await client.pttl(forever)) == -1


async def test_a_shared_hash_is_reported_unless_the_whole_hash_expires_within_the_limit(
    connectors: Connectors, client: Redis, prefix: str
) -> None:
    by_email, by_phone = f"{prefix}:by-email", f"{prefix}:by-phone"
    await client.hset(by_email, "one@example.org", "1")
    await client.hset(by_phone, "+100", "1")
    await client.expire(by_phone, 30 * DAY)
    task = _task(
        {
            "hash_fields": [
                {"key": by_email, "field": "{identity.email}"},
                {"key": by_phone, "field": "{identity.phone}"},
            ],
            "categories": ["user.contact"],
        }
    )

    _, applied = await _sweep(connectors, task, apply=True)

    [drift] = applied.values()
    assert drift.target == f"{by_email} field {{identity.email}}"
    assert (drift.count, drift.fixed) == (1, False)
    assert "a hash field cannot expire alone on Redis 7.0" in drift.breaks
    assert int(await client.pttl(by_email)) == -1  # never given a TTL: other fields share it


async def test_keys_of_a_subject_under_a_legal_hold_get_no_ttl(
    connectors: Connectors, client: Redis, prefix: str
) -> None:
    held, free = f"{prefix}:session:1:a", f"{prefix}:session:2:a"
    for key in (held, free):
        await client.set(key, "x")
    legal_hold = subject_hold("st-mary", "1")

    [result], applied = await _sweep(connectors, _sessions(prefix), apply=True, holds=[legal_hold])

    assert result.held == 1
    [drift] = applied.values()
    assert (drift.count, drift.fixed) == (2, False)
    assert int(await client.pttl(held)) == -1
    assert 0 < int(await client.pttl(free)) <= LIMIT_MS
    assert ":1:" not in result.detail and "hold" not in result.detail


async def test_a_pattern_that_does_not_name_its_subject_gets_no_ttl_under_a_subject_hold(
    connectors: Connectors, client: Redis, prefix: str
) -> None:
    key = f"{prefix}:token-of-1"
    await client.set(key, "x")
    task = _task(
        {"patterns": [f"{prefix}:token-of-{{subject_id}}"], "categories": ["user.contact"]}
    )
    [result], applied = await _sweep(
        connectors, task, apply=True, holds=[hold("subject", "f" * 32)]
    )

    assert result.held == 1
    assert [(d.count, d.fixed) for d in applied.values()] == [(1, False)]
    assert "do not name their subject as a whole segment" in result.detail
    assert int(await client.pttl(key)) == -1


async def test_a_hold_on_the_whole_task_changes_nothing(
    connectors: Connectors, client: Redis, prefix: str
) -> None:
    keys = await _seed(client, prefix)
    legal_hold = hold("system", "session-cache")

    [result], applied = await _sweep(connectors, _sessions(prefix), apply=True, holds=[legal_hold])

    assert result.held == 5
    assert legal_hold.id in result.detail
    assert _by_found(applied) == {"no TTL": (3, False), "TTL > 7776000s (90d)": (2, False)}
    assert await _ttls(client, keys["none"]) == [-1, -1, -1]
    assert all(ttl > 300 * DAY_MS for ttl in await _ttls(client, keys["long"]))


def test_a_key_names_its_subject_only_where_its_pattern_says_so_unambiguously() -> None:
    [plain, tenanted, free, glued] = targets(
        RedisLocator(
            patterns=[
                "s:{subject_id}:*",
                "t:{tenant}:[ab]?:{subject_id}",
                "u:*:{subject_id}:*",
                "v:id-{subject_id}",
            ],
            categories=["user.contact"],
        )
    )
    assert plain.match == "s:*:*" and glued.match == "v:id-*"
    assert owner(plain, b"s:42:profile:x") == ("42", None)
    assert owner(tenanted, b"t:st-mary:a7:42") == ("42", "st-mary")
    assert owner(tenanted, b"t:st-mary:c7:42") is None  # not a key of the pattern
    assert owner(free, b"u:a:42:b") == ("42", None)
    assert owner(free, b"u:a:b:c:d") is None  # 'b' or 'c': the key does not say
    assert owner(glued, b"v:id-42") is None  # not a whole segment
    assert owner(plain, b"s:\xff:x") is None


async def test_an_unreachable_redis_or_a_foreign_cursor_is_a_clear_error(
    connectors: Connectors, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = _sessions(prefix)
    with pytest.raises(ApplicationError) as foreign:
        await sweep_once(connectors, sweep_batch(task, NOW, cursor=["a", "b", "c"]))
    assert foreign.value.type == "ConfigurationError" and foreign.value.non_retryable

    monkeypatch.setenv("LETHE_STACK_REDIS_URL", "redis://127.0.0.1:1/0")
    with pytest.raises(ApplicationError) as down:
        await sweep_once(connectors, sweep_batch(task, NOW, apply=True))
    assert down.value.type == "ServiceUnavailable" and not down.value.non_retryable
    assert str(down.value).endswith("Redis at 127.0.0.1:1 did not answer (ConnectionError)")
