"""The raw floor's Redis: what the Redis connector's `erase_batch` sends for a batch, sent
directly. Find: TYPE of the hash key, one SCAN pass (MATCH the batch's common prefix) for the
glob template matched here, pipelined EXISTS for the literal keys and HEXISTS for the hash
fields; then pipelined UNLINK and HDEL; then the same find again as verification."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from bench import BenchError
from bench.erasure_parts.sample_data import Names, email_of

PIPELINE_CHUNK = 1000
SCAN_COUNT = 1000
"""As activities/cache.py: commands per pipelined round trip, slots per SCAN call."""
Item = TypeVar("Item")


@dataclass
class Found:
    """What a batch has in Redis now."""

    keys: list[bytes] = field(default_factory=list)
    fields: list[tuple[str, str]] = field(default_factory=list)
    existing: int = 0


def common_prefix(texts: list[str]) -> str:
    """The longest prefix every text shares (the batch's SCAN MATCH, as the connector's)."""
    first, last = min(texts), max(texts)
    n = 0
    while n < len(first) and first[n] == last[n]:
        n += 1
    return first[:n]


class RedisFloor:
    """A batch's keys and hash fields, found, removed and looked for again."""

    def __init__(self, redis: Redis, names: Names) -> None:
        """Use this client and the run's key names."""
        self.redis = redis
        self.names = names

    async def erase(self, ids: list[str]) -> None:
        """Find, unlink and delete, then verify nothing is left."""
        found = await self.find(ids)
        await self._pipelined(found.keys, lambda pipe, key: pipe.unlink(key))
        await self._pipelined(found.fields, lambda pipe, pair: pipe.hdel(*pair))
        left = await self.find(ids)
        if left.existing or left.fields:
            raise BenchError(f"floor: {left.existing} key(s), {len(left.fields)} field(s) left")

    async def find(self, ids: list[str]) -> Found:
        """The batch's keys (glob matches and literal keys) and its hash fields that exist."""
        prefix = f"{self.names.redis_prefix}:patient:"
        await self.redis.type(self.names.email_hash)
        wanted = set(ids)
        found = Found()
        match = prefix + common_prefix(ids) + "*"
        cursor = 0
        while True:
            cursor, keys = await self.redis.scan(cursor, match=match, count=SCAN_COUNT)
            for key in (k if isinstance(k, bytes) else k.encode() for k in keys):
                subject = key[len(prefix) :].split(b":", 1)[0].decode()
                if subject in wanted:
                    found.keys.append(key)
            if cursor == 0:
                break
        found.existing = len(found.keys)
        literal = [f"{self.names.redis_prefix}:session:{i}".encode() for i in ids]
        exists = await self._pipelined(literal, lambda pipe, key: pipe.exists(key))
        found.existing += sum(int(n) for n in exists)
        found.keys += literal
        pairs = [(self.names.email_hash, email_of(i)) for i in ids]
        present = await self._pipelined(pairs, lambda pipe, pair: pipe.hexists(*pair))
        found.fields = [pair for pair, there in zip(pairs, present, strict=True) if there]
        return found

    async def _pipelined(
        self, items: Sequence[Item], command: Callable[[Pipeline, Item], object]
    ) -> list[Any]:
        answers: list[Any] = []
        for start in range(0, len(items), PIPELINE_CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            for item in items[start : start + PIPELINE_CHUNK]:
                command(pipe, item)
            answers.extend(await pipe.execute())
        return answers
