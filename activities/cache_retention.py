"""Redis retention sweeps: every key under a locator's patterns must carry a TTL within the limit,
and none a TTL shorter than an obligation.

A cache removes its keys by itself when their TTL runs out, so a sweep removes nothing: it walks
the keys each pattern matches (its placeholders as `*`) with SCAN, a page at a time, reads their
TTLs and reports, per pattern and kind of problem, how many keys have none, one longer than the
limit, or one shorter than an obligation (`Drift`, named by the pattern, never a key). Where the
limit and an obligation both apply the obligation wins: keys may live as long as it says. A
hash field cannot expire alone on Redis 7.0, so a `hash_fields` entry is reported unless the
whole hash carries a TTL within the limit.

With `apply`, keys with no TTL or a longer one get `PEXPIRE key P LT` (pipelined), which only
ever shortens a TTL; a key too short for an obligation is reported, never changed. Keys of a
subject under a legal hold get no TTL: the subject is read back from a key where its pattern
holds `{subject_id}` as a whole segment; for any other pattern, while a subject hold is active,
no key gets one. A hold on the whole task stops every change.

Each call reads at most about `batch_size` keys (SCAN's COUNT is a hint: a page may hold a few
more) and reports the drift of its own pages; the workflow sums the calls. The cursor is
[pattern index, SCAN cursor]. SCAN may return a key twice, so counts are at least the truth.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

from redis.asyncio import Redis

from lethe.activities.connector import UnsupportedStep
from lethe.activities.driver_errors import translated
from lethe.activities.sweeps import SweepHolds, sweep_holds
from lethe.classification.datamap import RedisLocator, render, template_fields
from lethe.contracts import Drift, RuleTerm, SweepBatch, SweepResult, SweepTask
from lethe.kernel.deadlines import format_duration
from lethe.kernel.errors import ConfigurationError

SCAN_COUNT = 1000
"""How many slots one SCAN call walks at most."""
MAX_PAGES = 100
"""SCAN calls per batch at most, so a sparse pattern over a large keyspace still returns."""
Problem = Literal["none", "long", "short", "field"]
"""No TTL, a TTL above the limit, one below an obligation, a hash field that cannot expire."""
FIXABLE: tuple[Problem, ...] = ("none", "long")
_SUBJECT = "{subject_id}"
_TENANT = "{tenant}"
_PLACEHOLDER = re.compile(r"\{[^{}]*\}")


# --- what a key must carry (pure) ---------------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    """The TTLs the task's rules allow."""

    limit: RuleTerm | None
    obligation: RuleTerm | None
    """The longest obligation."""

    @property
    def most_ms(self) -> int | None:
        """The longest TTL allowed: the limit's, or the obligation's when longer; None: any."""
        if self.limit is None:
            return None
        return max(_ms(self.limit.period), self.least_ms or 0)

    @property
    def least_ms(self) -> int | None:
        """The shortest TTL allowed (the longest obligation); None: any."""
        return _ms(self.obligation.period) if self.obligation else None

    def judge(self, ttl_ms: int) -> Problem | None:
        """What is wrong with a key whose PTTL is `ttl_ms` (-1: none; -2: gone), if anything."""
        most, least = self.most_ms, self.least_ms
        if ttl_ms == -2:
            return None
        if ttl_ms == -1:
            return "none" if most is not None else None
        if most is not None and ttl_ms > most:
            return "long"
        if least is not None and ttl_ms < least:
            return "short"
        return None


def bounds(task: SweepTask) -> Bounds:
    """The task's limit and its longest obligation."""
    longest = max(task.obligations, key=lambda term: term.period, default=None)
    return Bounds(limit=task.limit, obligation=longest)


def _ms(period: timedelta) -> int:
    return period // timedelta(milliseconds=1)


def _shown(milliseconds: int) -> str:
    return f"{milliseconds // 1000}s ({format_duration(timedelta(milliseconds=milliseconds))})"


def drift(target: str, problem: Problem, rules: Bounds, count: int, fixed: bool) -> Drift:
    """The drift of `count` keys of `target` with `problem` (the same words on every page, so
    the workflow can sum them)."""
    found, wanted, breaks = _words(problem, rules)
    return Drift(
        target=target,
        setting="ttl",
        found=found,
        wanted=wanted,
        breaks=breaks,
        count=count,
        fixed=fixed,
    )


def _words(problem: Problem, rules: Bounds) -> tuple[str, str, str]:
    """For keys with `problem`: the TTL they have, the TTL the rules want, and which rule they
    break and how."""
    most, least = rules.most_ms, rules.least_ms
    if problem == "short":
        assert rules.obligation is not None and least is not None
        return (
            f"TTL < {_shown(least)}",
            f"TTL >= {_shown(least)}",
            f"{rules.obligation.rule}: keys expire before the {_period(rules.obligation)} "
            "they must be kept",
        )
    assert rules.limit is not None and most is not None
    wanted, rule = f"TTL <= {_shown(most)}", rules.limit.rule
    if problem == "field":
        return (
            f"no TTL <= {_shown(most)} on the hash",
            f"{wanted} on the hash, or the field in a key of its own",
            f"{rule}: a hash field cannot expire alone on Redis 7.0, and the hash holding it is "
            f"kept longer than {_period(rules.limit)}",
        )
    if problem == "none":
        return "no TTL", wanted, f"{rule}: keys kept for ever, with no TTL"
    return f"TTL > {_shown(most)}", wanted, f"{rule}: keys kept longer than {_shown(most)}"


def _period(term: RuleTerm) -> str:
    return format_duration(term.period, years=True)


# --- where the keys are, and whose (pure) -------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A pattern, or the key of a `hash_fields` entry, as a sweep scans it."""

    name: str
    """The template, placeholders and all: how drift names it."""
    match: str
    """The glob for SCAN MATCH: each placeholder as `*`."""
    hash_field: bool = False
    readers: tuple[re.Pattern[str], re.Pattern[str]] | None = None
    """Two readings of a key (free parts as long, then as short as they can be) giving its
    subject, and its tenant where a segment holds it; None: the key does not say."""


def targets(locator: RedisLocator) -> list[Target]:
    """The patterns, then the hash-field keys, in the order the cursor counts them."""
    found = [
        Target(name=template, match=_glob(template), readers=_readers(template))
        for template in locator.patterns
    ]
    found += [
        Target(name=f"{entry.key} field {entry.field}", match=_glob(entry.key), hash_field=True)
        for entry in locator.hash_fields
    ]
    return found


def _glob(template: str) -> str:
    return render(template, dict.fromkeys(template_fields(template), "*"))


def _readers(template: str) -> tuple[re.Pattern[str], re.Pattern[str]] | None:
    if _segment(template, _SUBJECT) is None:
        return None
    try:
        return re.compile(_regex(template, lazy=False)), re.compile(_regex(template, lazy=True))
    except re.error:
        return None


def _segment(template: str, placeholder: str) -> int | None:
    """Where `placeholder` first stands as a whole `:`-separated segment of `template`."""
    for found in re.finditer(re.escape(placeholder), template):
        start, end = found.span()
        if (start == 0 or template[start - 1] == ":") and (
            end == len(template) or template[end] == ":"
        ):
            return start
    return None


def _regex(template: str, *, lazy: bool) -> str:
    """A regular expression matching the keys of `template`, reading back its subject (and
    tenant) segment."""
    free = ".*?" if lazy else ".*"
    named = {_segment(template, _SUBJECT): "subject", _segment(template, _TENANT): "tenant"}
    parts, at = [], 0
    for found in _PLACEHOLDER.finditer(template):
        parts.append(_glob_regex(template[at : found.start()], free))
        name = named.get(found.start())
        parts.append(f"(?P<{name}>[^:]*)" if name else free)
        at = found.end()
    parts.append(_glob_regex(template[at:], free))
    return "".join(parts)


def _glob_regex(text: str, free: str) -> str:
    """Redis glob text (`*`, `?`, `[...]`, `\\` escapes) as a regular expression."""
    out, i = [], 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            out.append(re.escape(text[i + 1]))
            i += 2
            continue
        if char == "*":
            out.append(free)
        elif char == "?":
            out.append(".")
        elif char == "[" and (end := text.find("]", i + 1)) > i + 1:
            body = text[i + 1 : end]
            negated = body.startswith("^")
            body = body[1:] if negated else body
            inside = "".join(c if c == "-" else re.escape(c) for c in body)
            out.append(f"[{'^' if negated else ''}{inside}]")
            i = end
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


def owner(target: Target, key: bytes | str) -> tuple[str, str | None] | None:
    """The subject id (and tenant, where a segment holds it) a key names, or None when its
    pattern does not say or two readings of the key disagree."""
    if target.readers is None:
        return None
    try:
        text = key.decode() if isinstance(key, bytes) else key
    except UnicodeDecodeError:
        return None
    readings = [reader.fullmatch(text) for reader in target.readers]
    if any(reading is None for reading in readings):
        return None
    first, second = (reading.groupdict() for reading in readings if reading is not None)
    if first != second:
        return None
    return first["subject"], first.get("tenant")


# --- the sweep ---------------------------------------------------------------------------------


@dataclass
class _Page:
    """What one call found: keys per target and problem, those fixed, those held."""

    found: dict[tuple[int, Problem], int] = field(default_factory=dict)
    fixed: dict[tuple[int, Problem], int] = field(default_factory=dict)
    held: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, where: dict[tuple[int, Problem], int], index: int, problem: Problem) -> None:
        where[index, problem] = where.get((index, problem), 0) + 1

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


def _start(batch: SweepBatch) -> tuple[int, int]:
    """Where the batch starts: [pattern index, SCAN cursor]; ConfigurationError for a cursor
    that is not one this sweep returned."""
    cursor = batch.cursor
    if cursor is None:
        return 0, 0
    if len(cursor) == 2:
        index, position = cursor
        if isinstance(index, int) and isinstance(position, int) and min(index, position) >= 0:
            return index, position
    raise ConfigurationError(
        f"task {batch.task.id}: a Redis sweep resumes from [pattern index, SCAN cursor], "
        "which this cursor is not"
    )


class KeyRetention:
    """Compares the TTLs of a Redis cache's keys with retention rules and, asked to, sets them."""

    def __init__(self, client: Redis, where: str) -> None:
        """Over the worker's client; `where` (host:port, no credentials) names it in errors."""
        self._client, self._where = client, where

    async def sweep(self, batch: SweepBatch) -> SweepResult:
        """One page of the task's keys against its rules: their drift, with `apply` fixed."""
        task = batch.task
        if not isinstance(task.locator, RedisLocator):
            raise UnsupportedStep(f"task {task.id} names no Redis keys")
        scanned = targets(task.locator)
        rules = bounds(task)
        holds = sweep_holds(task, batch.holds)
        index, position = _start(batch)
        page = _Page()
        seen = pages = 0
        async with translated(f"Redis at {self._where}"):
            while index < len(scanned) and seen < batch.batch_size and pages < MAX_PAGES:
                target = scanned[index]
                count = min(SCAN_COUNT, batch.batch_size - seen)
                position, keys = await self._client.scan(position, match=target.match, count=count)
                pages, seen = pages + 1, seen + len(keys)
                if keys:
                    await self._judge(batch, holds, rules, index, target, keys, page)
                if position == 0:
                    index += 1
        done = index >= len(scanned)
        return SweepResult(
            task_id=task.id,
            held=page.held,
            cursor=None if done else [index, position],
            done=done,
            drift=[
                drift(
                    scanned[i].name,
                    problem,
                    rules,
                    count,
                    problem in FIXABLE and page.fixed.get((i, problem), 0) == count,
                )
                for (i, problem), count in page.found.items()
            ],
            detail="; ".join([f"{seen} key(s) read", *page.notes]),
        )

    async def _judge(
        self,
        batch: SweepBatch,
        holds: SweepHolds,
        rules: Bounds,
        index: int,
        target: Target,
        keys: Sequence[bytes | str],
        page: _Page,
    ) -> None:
        """Read the page's TTLs, tally what is wrong and, with `apply`, fix what may be."""
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.pttl(key)
        to_fix: list[tuple[bytes | str, Problem]] = []
        for key, ttl in zip(keys, await pipe.execute(), strict=True):
            problem = rules.judge(int(ttl))
            if problem in FIXABLE and target.hash_field:
                problem = "field"
            if problem is not None:
                page.add(page.found, index, problem)
            if problem in FIXABLE:
                to_fix.append((key, problem))
        if not (batch.apply and to_fix):
            return
        allowed = self._not_held(batch.task, holds, target, to_fix, page)
        if allowed and not batch.dry_run:
            await self._expire(rules, index, allowed, page)

    def _not_held(
        self,
        task: SweepTask,
        holds: SweepHolds,
        target: Target,
        keys: list[tuple[bytes | str, Problem]],
        page: _Page,
    ) -> list[tuple[bytes | str, Problem]]:
        """The keys no legal hold keeps; the others are counted held, and why said once."""
        if holds.whole:
            page.held += len(keys)
            page.note(f"legal hold(s) {', '.join(holds.whole)} keep the task: no TTL set")
            return []
        if not holds.subjects and not holds.tenants:
            return keys
        if target.readers is None:
            page.held += len(keys)
            page.note(
                f"pattern {target.name!r}: legal holds on subjects are active and its keys do "
                "not name their subject as a whole segment, so none was given a TTL"
            )
            return []
        allowed = []
        for key, problem in keys:
            read = owner(target, key)
            tenants = [read[1]] if read and read[1] else task.tenants
            if read is None or holds.keeps_subject(read[0], tenants):
                page.held += 1
            else:
                allowed.append((key, problem))
        return allowed

    async def _expire(
        self, rules: Bounds, index: int, keys: list[tuple[bytes | str, Problem]], page: _Page
    ) -> None:
        """`PEXPIRE key <most> LT` on each key (it only ever shortens a TTL); a key it did not
        change is fixed all the same when its TTL is now within the limit, or it is gone."""
        most = rules.most_ms
        assert most is not None
        pipe = self._client.pipeline(transaction=False)
        for key, _ in keys:
            pipe.pexpire(key, most, lt=True)
        answers = await pipe.execute()
        unchanged = [pair for pair, set_ in zip(keys, answers, strict=True) if not set_]
        fixed = [pair for pair, set_ in zip(keys, answers, strict=True) if set_]
        if unchanged:
            pipe = self._client.pipeline(transaction=False)
            for key, _ in unchanged:
                pipe.pttl(key)
            for pair, ttl in zip(unchanged, await pipe.execute(), strict=True):
                if int(ttl) == -2 or 0 <= int(ttl) <= most:
                    fixed.append(pair)
        for _, problem in fixed:
            page.add(page.fixed, index, problem)
