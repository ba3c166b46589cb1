"""The batch matcher of the Redis connector against the stack's Redis as the judge: for each
template rendered for subjects whose ids hold glob characters, the subjects the matcher gives a
key are exactly those whose own pattern Redis's SCAN MATCH returns the key for: with the id in
the glob's literal prefix, in its literal suffix, or in its middle."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from lethe.activities.cache import _Globs, _Matcher, glob_escape

IDS = ["s1", "s10", "s", "*", "?", "[0-9]", "\\", "s1*", "-", "é", "]"]
TAILS = ["", ":", ":x", ":a", ":ab", ":zz", "0", "0:x", "]", "]!", "]!!", ":é", "\\"]
HEADS = ["p:", "p:x", "p:ab", "p:x:", "p:xy:", "c:[", "t1:b-", "tx:d:"]
TEMPLATES = [
    "p:{id}:*",
    "p:*:{id}",
    "p:*{id}",
    "p:?{id}:*",
    "p:?:{id}",  # a middle of one byte between prefix and suffix
    "p:[ab]?{id}",
    "p:{id}:?[a-c]*",
    "p:{id}:[^x]",
    "p:{id}*",
    "t?:[a-c]*:{id}",
    "c:\\[{id}\\]?",
]


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[tuple[Redis, str]]:
    """A client of the stack's Redis and a key prefix of this test's own (removed after)."""
    redis = Redis.from_url(redis_url)
    prefix = f"test-cache-glob-{uuid.uuid4().hex[:10]}:"
    yield redis, prefix
    keys = [key async for key in redis.scan_iter(match=f"{prefix}*", count=1000)]
    if keys:
        await redis.unlink(*keys)
    await redis.aclose()


@pytest.mark.parametrize("template", TEMPLATES)
async def test_the_matcher_gives_each_key_the_subjects_redis_matches_it_for(
    raw: tuple[Redis, str], template: str
) -> None:
    redis, prefix = raw
    keys = [f"{prefix}{h}{i}{t}".encode() for h, i, t in itertools.product(HEADS, IDS, TAILS)]
    await redis.mset(dict.fromkeys(keys, b"v"))
    globs = [prefix + template.replace("{id}", glob_escape(i)) for i in IDS]
    by_redis: dict[bytes, set[int]] = {}
    for owner, glob in enumerate(globs):
        async for key in redis.scan_iter(match=glob, count=1000):
            by_redis.setdefault(key, set()).add(owner)

    matcher = _Matcher(list(enumerate(globs)), _Globs())

    assert by_redis  # Redis matched some keys: the comparison is not vacuous
    assert {key: set(matcher.owners(key)) for key in keys} == {
        key: by_redis.get(key, set()) for key in keys
    }
    # What the matcher scans for returns every key a subject's glob matches.
    scanned = {key async for key in redis.scan_iter(match=matcher.match, count=1000)}
    assert set(by_redis) <= scanned
