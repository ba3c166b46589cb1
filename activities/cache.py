"""The Redis connector: purges a subject's keys, found by glob pattern, and shared-hash fields.

Keys are found with SCAN (never KEYS, which blocks the server) and removed with UNLINK, which
frees memory off the main thread. The subject's values are glob-escaped before they go into a
pattern, so a subject id such as `*` matches only itself. Preflight changes nothing: it renders
the templates, logs in, checks the hash keys' types and asks `ACL DRYRUN` (Redis 7) whether the
connection's user may run what the step runs.

Erase first finds what is there (the keys the patterns match, the hash fields present), tells
it in a heartbeat and waits until the server holds it, then removes it and tells what it
removed (`lethe.activities.attempts`). Removing is idempotent; a retry after a lost worker reports
the earlier attempt's counts when they arrived, and says what it knows when they did not.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Self, TypeVar
from urllib.parse import unquote, urlsplit

from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, ResponseError

from lethe.activities.attempts import Journal
from lethe.activities.cache_retention import KeyRetention
from lethe.activities.clients import Clients
from lethe.activities.common import (
    SchemaMismatch,
    verdict,
)
from lethe.activities.connector import Connector
from lethe.activities.driver_errors import translated
from lethe.classification.datamap import MissingIdentity, RedisHashField, RedisLocator, render
from lethe.contracts import StepOutcome, StepRequest, SweepBatch, SweepResult
from lethe.kernel.errors import LetheError

T = TypeVar("T")

SCAN_COUNT = 1000
"""How many slots one SCAN call walks: large enough to be quick, small enough not to block."""
UNLINK_BATCH = 500
PREFLIGHT_TIMEOUT_SECONDS = 5.0
"""How long a preflight waits for Redis, all its calls together, before it says it is down."""
_GLOB_CHARACTERS = re.compile(r"([*?\[\]\\])")


def glob_escape(value: str) -> str:
    """`value` with Redis glob characters (`* ? [ ] \\`) escaped, so that it matches only itself."""
    return _GLOB_CHARACTERS.sub(r"\\\1", value)


@dataclass(frozen=True)
class _Pattern:
    index: int
    match: str
    """The glob, with the subject's values escaped."""
    key: str | None
    """The one key the pattern names, when its template has no glob character of its own."""
    name: str = ""
    """The template filled in unescaped: the name the keys it matches have (for ACL checks)."""


@dataclass(frozen=True)
class _HashField:
    index: int
    key: str
    field: str


@dataclass(frozen=True)
class _Targets:
    patterns: list[_Pattern]
    hash_fields: list[_HashField]


def _pattern(index: int, template: str, values: dict[str, str]) -> _Pattern:
    # Rendering every value as "" leaves the template's own text: if that holds no glob
    # character, the pattern names exactly one key and needs no scan of the keyspace.
    own_text = render(template, values, escape=lambda _: "")
    literal = _GLOB_CHARACTERS.search(own_text) is None
    return _Pattern(
        index=index,
        match=render(template, values, escape=glob_escape),
        key=render(template, values) if literal else None,
        name=render(template, values),
    )


def _hash_field(index: int, entry: RedisHashField, values: dict[str, str]) -> _HashField:
    return _HashField(index=index, key=render(entry.key, values), field=render(entry.field, values))


def _targets(request: StepRequest) -> _Targets:
    """Render every pattern and hash field first, so a missing identity destroys nothing."""
    locator = CacheEraser.locator(request)
    values = request.subject.template_values(request.subject_ref)
    return _Targets(
        patterns=[_pattern(i, t, values) for i, t in enumerate(locator.patterns)],
        hash_fields=[_hash_field(i, e, values) for i, e in enumerate(locator.hash_fields)],
    )


def _rendered(request: StepRequest) -> tuple[_Targets, list[str]]:
    """What renders of the locator, and a problem for each template that does not (a missing
    identity), naming the template by index, never a value."""
    locator = CacheEraser.locator(request)
    system = request.step.system
    values = request.subject.template_values(request.subject_ref)
    patterns: list[_Pattern] = []
    hash_fields: list[_HashField] = []
    problems: list[str] = []
    for index, template in enumerate(locator.patterns):
        try:
            patterns.append(_pattern(index, template, values))
        except MissingIdentity as exc:
            problems.append(f"Redis system {system!r}: pattern {index}: {exc}")
    for index, entry in enumerate(locator.hash_fields):
        try:
            hash_fields.append(_hash_field(index, entry, values))
        except MissingIdentity as exc:
            problems.append(f"Redis system {system!r}: hash_fields {index}: {exc}")
    return _Targets(patterns=patterns, hash_fields=hash_fields), problems


def _acl_checks(targets: _Targets) -> list[tuple[str, str, list[str]]]:
    """What the step runs, as (what it is run on, command, arguments) for `ACL DRYRUN`.

    A glob pattern is checked with its template filled in (glob and all) as the key name: an
    ACL key pattern that admits that name admits the keys it matches, as far as one name can
    tell."""
    checks: list[tuple[str, str, list[str]]] = []
    for pattern in targets.patterns:
        on = f"the keys of pattern {pattern.index}"
        checks.append((on, "UNLINK", [pattern.name]))
        if pattern.key is not None:
            checks.append((on, "EXISTS", [pattern.key]))
    globs = [p.index for p in targets.patterns if p.key is None]
    if globs:
        on = f"the keyspace (pattern(s) {globs} scan it)"
        checks.append((on, "SCAN", ["0", "COUNT", str(SCAN_COUNT)]))
    for entry in targets.hash_fields:
        on = f"the key of hash_fields {entry.index}"
        checks.append((on, "HDEL", [entry.key, entry.field]))
        checks.append((on, "HEXISTS", [entry.key, entry.field]))
    return checks


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"


class CacheEraser(Connector[RedisLocator]):
    """Unlinks the subject's keys and deletes their hash fields in a Redis cache."""

    kind = "redis"
    locator_model = RedisLocator
    actions = ("purge",)
    checks = (
        "every template renders; Redis answers to these credentials; hash_fields keys are "
        "hashes or absent; ACL DRYRUN, where the server answers it, allows each command"
    )
    proves = "no key matches the patterns and no hash field remains (a scan after the purge)"
    retries = "the keys and fields found, heartbeated and confirmed before they are removed"
    sweeps = (
        "every key under the patterns carries a TTL within the limit (drift per pattern); "
        "apply sets it with PEXPIRE ... LT"
    )

    def __init__(self, client: Redis, where: str = "", user: str = "default") -> None:
        """Use `client`; `where` (host:port, no credentials) names the server in errors;
        `user` is the ACL user the connection logs in as, when the server cannot say."""
        self._client = client
        self._where = where
        self._user = user

    @classmethod
    def open(cls, clients: Clients, connection: str) -> Self:
        """An eraser on the worker's client for the Redis at `connection`."""
        user = unquote(urlsplit(connection).username or "default")
        return cls(clients.redis(connection), _where(connection), user)

    async def erase(self, request: StepRequest) -> StepOutcome:
        """Unlink the subject's keys and delete their hash fields; `running` until verified."""
        step = request.step
        targets = _targets(request)
        journal = Journal.resume(request)
        try:
            await self._call(lambda: self._check_hashes(targets.hash_fields))
            keys, existing = await self._call(lambda: self._find_keys(targets.patterns, journal))
            fields = await self._call(lambda: self._present_fields(targets.hash_fields))
            await journal.plan(keys=existing, hash_fields=len(fields))
            unlinked, removed = await self._call(lambda: self._remove(keys, fields))
        except LetheError:
            journal.failed()
            raise
        journal.erased(keys_unlinked=unlinked, hash_fields_removed=removed)
        keys_unlinked = journal.total("keys_unlinked", "keys")
        fields_removed = journal.total("hash_fields_removed", "hash_fields")
        return StepOutcome(
            step_id=step.id,
            status="running",
            affected=journal.affected(),
            evidence={
                "patterns": len(targets.patterns),
                "hash_fields": len(targets.hash_fields),
                "keys_unlinked": keys_unlinked,
                "hash_fields_removed": fields_removed,
                **journal.evidence(),
            },
            detail=_erase_detail(journal, unlinked, removed),
        )

    async def verify(self, request: StepRequest, erased: StepOutcome) -> StepOutcome:
        """Scan again: `done` when no key matches any pattern and no hash field is left."""
        step = request.step
        targets = _targets(request)
        journal = Journal.current(request) or Journal(request.request_id, step.id)
        keys_left = await self._call(lambda: self._count_keys(targets.patterns, journal))
        fields_left = await self._call(lambda: self._count_hash_fields(targets.hash_fields))
        evidence = {
            **erased.evidence,
            "keys_remaining": keys_left,
            "hash_fields_remaining": fields_left,
        }
        problems = (
            [
                f"{keys_left} key(s) still match the patterns and {fields_left} hash "
                "field(s) remain after the purge"
            ]
            if keys_left or fields_left
            else []
        )
        return verdict(
            erased, evidence, problems, "no key matches the patterns and no hash field remains"
        )

    async def preflight(self, request: StepRequest) -> list[str]:
        """Touching nothing: every template renders, Redis answers to these credentials, each
        hash_fields key is a hash or absent, and (where the server answers `ACL DRYRUN`) the
        connection's user may run what the step runs on what the locator names."""
        targets, problems = _rendered(request)
        system = request.step.system

        async def checks() -> list[str]:
            async with asyncio.timeout(PREFLIGHT_TIMEOUT_SECONDS):
                refused = await self._login_problem(system)
                if refused:
                    return [refused]
                return [
                    *await self._hash_problems(system, targets.hash_fields),
                    *await self._acl_problems(system, targets),
                ]

        return problems + await self._call(checks)

    async def sweep(self, batch: SweepBatch) -> SweepResult:
        """One page of the task's keys against its retention rules: TTL drift reported and,
        with `apply`, set (`lethe.activities.cache_retention`)."""
        return await KeyRetention(self._client, self._where).sweep(batch)

    async def _login_problem(self, system: str) -> str | None:
        """A problem when Redis refuses this connection (credentials, database); raises
        RedisError or OSError when it does not answer."""
        try:
            await self._client.ping()
        except AuthenticationError:
            return f"Redis system {system!r} at {self._where} refused the credentials"
        except ResponseError as exc:
            # NOPERM on PING, or a database number out of range: a refusal, not an outage.
            return f"Redis system {system!r} at {self._where} refused PING ({type(exc).__name__})"
        return None

    async def _hash_problems(self, system: str, hash_fields: list[_HashField]) -> list[str]:
        if not hash_fields:
            return []
        pipe = self._client.pipeline(transaction=False)
        for entry in hash_fields:
            pipe.type(entry.key)
        problems = []
        for entry, kind in zip(hash_fields, await pipe.execute(raise_on_error=False), strict=True):
            if isinstance(kind, ResponseError):
                problems.append(
                    f"Redis system {system!r}: TYPE of the key of hash_fields {entry.index} "
                    f"was refused ({type(kind).__name__})"
                )
            elif isinstance(kind, Exception):
                raise kind
            elif kind not in (b"hash", b"none"):
                shown = kind.decode(errors="replace") if isinstance(kind, bytes) else str(kind)
                problems.append(
                    f"Redis system {system!r}: the key of hash_fields {entry.index} is not a "
                    f"hash (it holds a {shown})"
                )
        return problems

    async def _acl_problems(self, system: str, targets: _Targets) -> list[str]:
        """What `ACL DRYRUN` denies the connection's user; nothing when the server cannot say
        (before Redis 7, or a user who may not ask)."""
        checks = _acl_checks(targets)
        if not checks:
            return []
        try:
            user = await self._client.acl_whoami()
        except ResponseError:
            user = self._user  # no ACL command (before Redis 6), or not allowed to ask
        name = user.decode(errors="replace") if isinstance(user, bytes) else str(user)
        pipe = self._client.pipeline(transaction=False)
        for _, command, args in checks:
            pipe.execute_command("ACL", "DRYRUN", name, command, *args)
        answers = await pipe.execute(raise_on_error=False)
        problems = []
        for (on, command, _), answer in zip(checks, answers, strict=True):
            if isinstance(answer, ResponseError):
                continue  # the server cannot answer: unknown subcommand, NOPERM, unknown user
            if isinstance(answer, Exception):
                raise answer
            if answer not in (b"OK", "OK"):
                # The server's reason quotes the key, which holds the subject's values.
                problems.append(
                    f"Redis system {system!r}: the ACL of user {name!r} does not allow "
                    f"{command} on {on}"
                )
        return problems

    async def _find_keys(
        self, patterns: list[_Pattern], journal: Journal
    ) -> tuple[list[bytes | str], int]:
        """The keys to unlink: those the glob patterns match now, and every key a literal
        pattern names (unlinking one that is absent does nothing); and how many exist now."""
        found: dict[bytes | str, None] = {}
        for pattern in patterns:
            if pattern.key is None:
                async for keys in self._scan(pattern, journal):
                    found.update(dict.fromkeys(keys))
        literal = [p.key for p in patterns if p.key is not None and p.key not in found]
        existing = len(found)
        if literal:
            pipe = self._client.pipeline(transaction=False)
            for key in literal:
                pipe.exists(key)
            existing += sum(await pipe.execute())
        return [*found, *dict.fromkeys(literal)], existing

    async def _present_fields(self, hash_fields: list[_HashField]) -> list[_HashField]:
        """The hash fields that exist now."""
        if not hash_fields:
            return []
        pipe = self._client.pipeline(transaction=False)
        for entry in hash_fields:
            pipe.hexists(entry.key, entry.field)
        present = await pipe.execute()
        return [entry for entry, there in zip(hash_fields, present, strict=True) if there]

    async def _remove(
        self, keys: list[bytes | str], hash_fields: list[_HashField]
    ) -> tuple[int, int]:
        """The effect: unlink `keys` and delete `hash_fields`; how many of each went."""
        if not keys and not hash_fields:
            return 0, 0
        pipe = self._client.pipeline(transaction=False)
        for start in range(0, len(keys), UNLINK_BATCH):
            pipe.unlink(*keys[start : start + UNLINK_BATCH])
        for entry in hash_fields:
            pipe.hdel(entry.key, entry.field)
        answers = await pipe.execute()
        batches = -(-len(keys) // UNLINK_BATCH)
        return sum(answers[:batches]), sum(answers[batches:])

    async def _check_hashes(self, hash_fields: list[_HashField]) -> None:
        """Refuse, before anything is deleted, a hash-field key that holds something else."""
        if not hash_fields:
            return
        pipe = self._client.pipeline(transaction=False)
        for entry in hash_fields:
            pipe.type(entry.key)
        kinds = await pipe.execute()
        wrong = [
            e.index
            for e, kind in zip(hash_fields, kinds, strict=True)
            if kind not in (b"hash", b"none")
        ]
        if wrong:
            raise SchemaMismatch(
                f"Redis at {self._where}: the key of hash_fields {wrong} is not a hash"
            )

    async def _count_keys(self, patterns: list[_Pattern], journal: Journal) -> int:
        left = 0
        for pattern in patterns:
            if pattern.key is not None:
                left += await self._client.exists(pattern.key)
                continue
            async for keys in self._scan(pattern, journal):
                left += len(keys)
        return left

    async def _count_hash_fields(self, hash_fields: list[_HashField]) -> int:
        if not hash_fields:
            return 0
        await self._check_hashes(hash_fields)
        pipe = self._client.pipeline(transaction=False)
        for entry in hash_fields:
            pipe.hexists(entry.key, entry.field)
        return sum(bool(found) for found in await pipe.execute())

    async def _scan(self, pattern: _Pattern, journal: Journal) -> AsyncIterator[list[bytes | str]]:
        cursor, pages = 0, 0
        while True:
            cursor, keys = await self._client.scan(cursor, match=pattern.match, count=SCAN_COUNT)
            pages += 1
            journal.alive(scanning=f"pattern {pattern.index}: {pages} scan page(s)")
            if keys:
                yield keys
            if cursor == 0:
                return

    async def _call(self, work: Callable[[], Awaitable[T]]) -> T:
        # Redis errors can quote keys, which hold subject ids: only the type leaves here.
        with translated(f"Redis at {self._where}"):
            return await work()


def _erase_detail(journal: Journal, unlinked: int, removed: int) -> str:
    done = f"unlinked {unlinked} key(s), removed {removed} hash field(s)"
    earlier = journal.earlier
    if earlier is None:
        return done
    if earlier == "recorded":
        return f"{done} in this attempt; the earlier attempts' counts are included"
    if earlier == "planned":
        keys = journal.unconfirmed.get("keys", 0)
        fields = journal.unconfirmed.get("hash_fields", 0)
        return (
            f"{done} in this attempt; an earlier attempt had found {keys} key(s) and "
            f"{fields} hash field(s) and was about to remove them when its worker was lost: "
            "how many it removed is not known"
        )
    return (
        f"{done} in this attempt; no heartbeat of an earlier attempt arrived, so what it "
        "removed, if anything, is not known"
    )
