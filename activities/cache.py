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

One code path erases a batch of subjects (bulk erasure, `erase_batch`) and one subject (`erase`,
a batch of one). A pattern whose template has no glob character of its own names one key per
subject: pipelined EXISTS and UNLINK, no SCAN. A glob template is one SCAN pass for the whole
batch, over the subjects' common literal prefix (a batch of one: its own pattern), each key
matched here against every subject's glob as Redis would (looked up by the glob's literal
prefix and suffix; the middle between them one regex for all subjects whose middles are alike,
none for `*`). Hash fields: pipelined HEXISTS and HDEL. Each subject's counts are exact (one
UNLINK for a subject's own keys, one for each key subjects share, one HDEL per field,
pipelined) and ride in the batch's heartbeats, so a retry knows them; a subject whose templates
do not render or whose hash key is not a hash fails alone. The templates are rendered and the
globs read once per batch, for the purge and its verification.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Self, TypeVar
from urllib.parse import unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
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
from lethe.activities.redis_glob import glob_parts, glob_regex
from lethe.classification.datamap import MissingIdentity, RedisHashField, RedisLocator, render
from lethe.contracts import (
    BatchStepOutcome,
    BatchStepRequest,
    Evidence,
    StepOutcome,
    StepRequest,
    Subject,
    SubjectOutcome,
    SweepBatch,
    SweepResult,
)
from lethe.kernel.errors import LetheError

T = TypeVar("T")
Item = TypeVar("Item")

SCAN_COUNT = 1000
"""How many slots one SCAN call walks: large enough to be quick, small enough not to block."""
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


def _pattern(
    index: int, template: str, values: dict[str, str], literal: bool | None = None
) -> _Pattern:
    """The pattern rendered for one subject; `literal`: whether the template names one key,
    when already known (`_names_one_key`)."""
    if literal is None:
        literal = _names_one_key(template, values)
    name = render(template, values)
    return _Pattern(
        index=index,
        match=render(template, values, escape=glob_escape),
        key=name if literal else None,
        name=name,
    )


def _names_one_key(template: str, values: dict[str, str]) -> bool:
    """Whether the template has no glob character of its own: it then names exactly one key
    and needs no scan of the keyspace (rendering every value as "" leaves its own text)."""
    return _GLOB_CHARACTERS.search(render(template, values, escape=lambda _: "")) is None


def _hash_field(index: int, entry: RedisHashField, values: dict[str, str]) -> _HashField:
    return _HashField(index=index, key=render(entry.key, values), field=render(entry.field, values))


class _Renderer:
    """A locator's templates rendered for one subject after another, every one before anything
    is touched, so a missing identity destroys nothing. Whether a pattern template names one
    key is read once, from the first subject it renders for."""

    def __init__(self, locator: RedisLocator) -> None:
        """Render `locator`'s patterns and hash fields."""
        self._locator = locator
        self._literal: dict[int, bool] = {}

    def subjects(self, items: Sequence[tuple[str, Subject]]) -> list[_Subject]:
        """Each (subject_ref, subject) rendered, or its problem (a missing identity)."""
        return [self.subject(ref, subject) for ref, subject in items]

    def subject(self, ref: str, subject: Subject) -> _Subject:
        """One subject's patterns and hash fields, or its problem (a missing identity)."""
        values = subject.template_values(ref)
        try:
            patterns = [self._pattern(i, t, values) for i, t in enumerate(self._locator.patterns)]
            hash_fields = [
                _hash_field(i, e, values) for i, e in enumerate(self._locator.hash_fields)
            ]
        except MissingIdentity as exc:
            return _Subject([], [], exc)
        return _Subject(patterns, hash_fields)

    def _pattern(self, index: int, template: str, values: dict[str, str]) -> _Pattern:
        literal = self._literal.get(index)
        if literal is None:
            literal = self._literal[index] = _names_one_key(template, values)
        return _pattern(index, template, values, literal)


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
    batching = (
        "one SCAN pass per glob pattern for the whole batch (exact keys need none); UNLINK, "
        "HDEL and the checks pipelined"
    )
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
        self.scans = 0
        """SCAN calls this eraser made (a batch's evidence says how many)."""

    @classmethod
    def open(cls, clients: Clients, connection: str) -> Self:
        """An eraser on the worker's client for the Redis at `connection`."""
        user = unquote(urlsplit(connection).username or "default")
        return cls(clients.redis(connection), _where(connection), user)

    async def erase(self, request: StepRequest) -> StepOutcome:
        """Unlink the subject's keys and delete their hash fields; `running` until verified.
        The batch code (`erase_batch`) with a batch of one; a subject's problem is raised."""
        rendered = [_Renderer(self.locator(request)).subject(request.subject_ref, request.subject)]
        journal = Journal.resume(request)
        purged = await self._purge(rendered, journal, _Globs())
        problem = purged.subjects[0].problem
        if problem is not None:
            journal.failed()
            raise problem
        return StepOutcome(
            step_id=request.step.id,
            status="running",
            affected=journal.affected(),
            evidence={
                "patterns": len(purged.subjects[0].patterns),
                "hash_fields": len(purged.subjects[0].hash_fields),
                "keys_unlinked": journal.total("keys_unlinked", "keys"),
                "hash_fields_removed": journal.total("hash_fields_removed", "hash_fields"),
                **journal.evidence(),
            },
            detail=_erase_detail(journal, purged.unlinked, purged.removed),
        )

    async def verify(self, request: StepRequest, erased: StepOutcome) -> StepOutcome:
        """Look again: `done` when no key matches any pattern and no hash field is left."""
        rendered = [_Renderer(self.locator(request)).subject(request.subject_ref, request.subject)]
        journal = Journal.current(request) or Journal(request.request_id, request.step.id)
        subjects, found = await self._call(lambda: self._state(rendered, journal, _Globs()))
        problem = subjects[0].problem
        if problem is not None:
            raise problem
        keys_left, fields_left = found[0].existing, len(found[0].fields)
        evidence = {
            **erased.evidence,
            "keys_remaining": keys_left,
            "hash_fields_remaining": fields_left,
        }
        problems = [_left_detail(keys_left, fields_left)] if keys_left or fields_left else []
        return verdict(erased, evidence, problems, _CLEAN)

    async def erase_batch(self, batch: BatchStepRequest) -> BatchStepOutcome:
        """Purge a batch of subjects: one SCAN pass per glob template for the whole batch,
        pipelined EXISTS, UNLINK, HEXISTS and HDEL; then verify it the same way. A subject
        whose templates do not render, or whose hash key is not a hash, fails alone. The
        templates are rendered and the globs read once, for the purge and its verification."""
        locator = self.locator(batch)
        rendered = _Renderer(locator).subjects(_items(batch))
        globs = _Globs()
        journal = Journal.resume(batch)
        purged = await self._purge(rendered, journal, globs)
        checked, left = await self._call(lambda: self._state(rendered, journal, globs))
        earlier = _Earlier.of(journal, len(rendered))
        outcomes = [
            _subject_outcome(
                item.subject_ref,
                purged.subjects[i].problem or checked[i].problem,
                left[i],
                earlier.affected(i, purged.made[i]),
                _subject_detail(journal, earlier, i, purged.made[i]),
            )
            for i, item in enumerate(batch.subjects)
        ]
        evidence: Evidence = {
            "subjects": len(outcomes),
            "subjects_failed": sum(o.status == "failed" for o in outcomes),
            "patterns": len(locator.patterns),
            "hash_fields": len(locator.hash_fields),
            "keys_unlinked": journal.total("keys_unlinked", "keys"),
            "hash_fields_removed": journal.total("hash_fields_removed", "hash_fields"),
            "keys_remaining": sum(found.existing for found in left),
            "hash_fields_remaining": sum(len(found.fields) for found in left),
            "scan_calls": self.scans,
            **journal.evidence(),
        }
        done = sum(o.status == "done" for o in outcomes)
        return BatchStepOutcome(
            step_id=batch.step.id,
            outcomes=outcomes,
            evidence=evidence,
            detail=f"{done} of {len(outcomes)} subject(s) done; "
            + _erase_detail(journal, purged.unlinked, purged.removed),
        )

    async def verify_batch(
        self, batch: BatchStepRequest, erased: BatchStepOutcome
    ) -> BatchStepOutcome:
        """Look again for every subject of the batch (the same single pass per template):
        `done` for each with no key and no hash field left."""
        rendered = _Renderer(self.locator(batch)).subjects(_items(batch))
        journal = Journal.current(batch) or Journal(batch.request_id, batch.step.id)
        checked, left = await self._call(lambda: self._state(rendered, journal, _Globs()))
        before = {o.subject_ref: o for o in erased.outcomes}
        outcomes = []
        for i, item in enumerate(batch.subjects):
            earlier = before.get(item.subject_ref)
            outcomes.append(
                _subject_outcome(
                    item.subject_ref,
                    checked[i].problem,
                    left[i],
                    earlier.affected if earlier is not None else 0,
                    "looked again",
                )
            )
        return BatchStepOutcome(
            step_id=batch.step.id,
            outcomes=outcomes,
            evidence={
                **erased.evidence,
                "keys_remaining": sum(found.existing for found in left),
                "hash_fields_remaining": sum(len(found.fields) for found in left),
                "scan_calls": self.scans,
            },
            detail=f"{sum(o.status == 'done' for o in outcomes)} of {len(outcomes)} subject(s) "
            "hold nothing",
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

    async def _purge(self, rendered: list[_Subject], journal: Journal, globs: _Globs) -> _Purge:
        """The effect for every subject that renders: find (one pass per glob template),
        heartbeat the plan, then unlink and delete; per-subject counts."""
        try:
            subjects = await self._call(lambda: self._checked(rendered))
            purge = _Purge(subjects, [(0, 0)] * len(subjects))
            if all(subject.problem is not None for subject in subjects):
                return purge
            found = await self._call(lambda: self._find(subjects, journal, globs))
            keys: dict[bytes, bool] = {}
            for each in found:
                for key, exists in each.keys.items():
                    keys[key] = keys.get(key, False) or exists
            groups, credited = _unlink_groups(found)
            fields = list(dict.fromkeys(pair for each in found for pair in each.fields))
            earlier = _Earlier.of(journal, len(subjects))
            journal.progress[_PER_SUBJECT] = {
                "made": earlier.made,
                "planned": [[each.existing, len(each.fields)] for each in found],
            }
            await journal.plan(keys=sum(keys.values()), hash_fields=len(fields))
            answers = _Answers()
            purge.unlinked, purge.removed = await self._call(
                lambda: self._remove(groups, fields, answers)
            )
        except LetheError:
            journal.failed()
            raise
        by_field = dict(zip(fields, answers.removed, strict=True))
        purge.made = [
            (sum(answers.unlinked[g] for g in mine), sum(by_field[f] for f in each.fields))
            for mine, each in zip(credited, found, strict=True)
        ]
        journal.progress[_PER_SUBJECT] = {
            "made": [
                [k + m[0], f + m[1]] for (k, f), m in zip(earlier.made, purge.made, strict=True)
            ],
            "planned": [],
        }
        journal.erased(keys_unlinked=purge.unlinked, hash_fields_removed=purge.removed)
        return purge

    async def _state(
        self, rendered: list[_Subject], journal: Journal, globs: _Globs
    ) -> tuple[list[_Subject], list[_Found]]:
        """What each subject has in Redis now (the same search as the purge's)."""
        subjects = await self._checked(rendered)
        return subjects, await self._find(subjects, journal, globs)

    async def _checked(self, rendered: list[_Subject]) -> list[_Subject]:
        """The rendered subjects, each with its problem: a missing identity, or a hash-field
        key that holds something else than a hash now (one pipelined TYPE per key)."""
        hash_keys = list(dict.fromkeys(e.key for s in rendered for e in s.hash_fields))
        kinds = await self._pipelined(hash_keys, lambda pipe, key: pipe.type(key))
        wrong = {key for key, kind in zip(hash_keys, kinds, strict=True) if kind not in _HASHES}
        subjects = []
        for subject in rendered:
            bad = [e.index for e in subject.hash_fields if e.key in wrong]
            problem = subject.problem
            if bad and problem is None:
                problem = SchemaMismatch(
                    f"Redis at {self._where}: the key of hash_fields {bad} is not a hash"
                )
            subjects.append(_Subject(subject.patterns, subject.hash_fields, problem))
        return subjects

    async def _find(
        self, subjects: list[_Subject], journal: Journal, globs: _Globs
    ) -> list[_Found]:
        """What each subject without a problem has now: the keys its glob patterns match (one
        SCAN pass per template for all subjects, matched here), the keys its literal patterns
        name (pipelined EXISTS), and its hash fields that exist (pipelined HEXISTS)."""
        found = [_Found() for _ in subjects]
        live = [(i, s) for i, s in enumerate(subjects) if s.problem is None]
        by_template: dict[int, list[tuple[int, str]]] = {}
        for i, subject in live:
            for pattern in subject.patterns:
                if pattern.key is None:
                    by_template.setdefault(pattern.index, []).append((i, pattern.match))
        for index, owned in sorted(by_template.items()):
            matcher = _Matcher(owned, globs)
            async for keys in self._scan(index, matcher.match, journal):
                for key in map(_raw, keys):
                    for owner in matcher.owners(key):
                        found[owner].keys[key] = True
        literal = list(
            dict.fromkeys(_raw(p.key) for _, s in live for p in s.patterns if p.key is not None)
        )
        answers = await self._pipelined(literal, lambda pipe, key: pipe.exists(key))
        exists = dict(zip(literal, answers, strict=True))
        pairs = list(dict.fromkeys((e.key, e.field) for _, s in live for e in s.hash_fields))
        answers = await self._pipelined(pairs, lambda pipe, pair: pipe.hexists(*pair))
        present = dict(zip(pairs, answers, strict=True))
        for i, subject in live:
            for pattern in subject.patterns:
                if pattern.key is not None:
                    key = _raw(pattern.key)
                    found[i].keys[key] = found[i].keys.get(key, False) or bool(exists[key])
            found[i].fields = [
                pair
                for pair in dict.fromkeys((e.key, e.field) for e in subject.hash_fields)
                if present[pair]
            ]
        return found

    async def _remove(
        self,
        keys: list[tuple[bytes, ...]],
        hash_fields: list[tuple[str, str]],
        answers: _Answers,
    ) -> tuple[int, int]:
        """The effect: unlink `keys` (one UNLINK a group, `_unlink_groups`) and delete
        `hash_fields` (one HDEL each), pipelined (what each answered goes into `answers`, so
        each subject's count is exact); how many of each went."""
        unlinked = await self._pipelined(keys, lambda pipe, group: pipe.unlink(*group))
        removed = await self._pipelined(hash_fields, lambda pipe, pair: pipe.hdel(*pair))
        answers.unlinked = [int(n) for n in unlinked]
        answers.removed = [int(n) for n in removed]
        return sum(answers.unlinked), sum(answers.removed)

    async def _pipelined(
        self, items: Sequence[Item], command: Callable[[Pipeline, Item], object]
    ) -> list[Any]:
        """`command` for every item, pipelined, PIPELINE_CHUNK commands a round trip."""
        answers: list[Any] = []
        for start in range(0, len(items), PIPELINE_CHUNK):
            pipe = self._client.pipeline(transaction=False)
            for item in items[start : start + PIPELINE_CHUNK]:
                command(pipe, item)
            answers.extend(await pipe.execute())
        return answers

    async def _scan(self, index: int, match: str, journal: Journal) -> AsyncIterator[list[Any]]:
        cursor, pages = 0, 0
        while True:
            cursor, keys = await self._client.scan(cursor, match=match, count=SCAN_COUNT)
            pages += 1
            self.scans += 1
            journal.alive(scanning=f"pattern {index}: {pages} scan page(s)")
            if keys:
                yield keys
            if cursor == 0:
                return

    async def _call(self, work: Callable[[], Awaitable[T]]) -> T:
        # Redis errors can quote keys, which hold subject ids: only the type leaves here.
        with translated(f"Redis at {self._where}"):
            return await work()


def _unlink_groups(found: list[_Found]) -> tuple[list[tuple[bytes, ...]], list[list[int]]]:
    """The keys to unlink in groups whose UNLINK answers for one subject, and for each subject
    the groups its count is the sum of: a subject's own keys (no other subject's pattern gives
    them) together, UNLINK_GROUP at most a command; a key subjects share alone, counted for
    each of them."""
    owners = Counter(key for each in found for key in each.keys)
    groups: list[tuple[bytes, ...]] = []
    credited: list[list[int]] = []
    alone: dict[bytes, int] = {}
    for each in found:
        own = [key for key in each.keys if owners[key] == 1]
        mine = []
        for start in range(0, len(own), UNLINK_GROUP):
            mine.append(len(groups))
            groups.append(tuple(own[start : start + UNLINK_GROUP]))
        for key in each.keys:
            if owners[key] > 1:
                if key not in alone:
                    alone[key] = len(groups)
                    groups.append((key,))
                mine.append(alone[key])
        credited.append(mine)
    return groups, credited


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


PIPELINE_CHUNK = 1000
"""Commands in one pipelined round trip (TYPE, EXISTS, HEXISTS, UNLINK, HDEL)."""
UNLINK_GROUP = 100
"""Keys of one subject one UNLINK removes at most."""
_PER_SUBJECT = "per_subject"
"""The key of a batch's heartbeat progress with each subject's counts, in the batch's order."""
_HASHES = (b"hash", b"none", "hash", "none")
_CLEAN = "no key matches the patterns and no hash field remains"


@dataclass
class _Subject:
    """One subject of a batch: what its templates render to, or why it is left out."""

    patterns: list[_Pattern]
    hash_fields: list[_HashField]
    problem: LetheError | None = None


@dataclass
class _Found:
    """What one subject has in Redis now."""

    keys: dict[bytes, bool] = field(default_factory=dict)
    """The keys to unlink (glob matches, and every key a literal pattern names): exists now?"""
    fields: list[tuple[str, str]] = field(default_factory=list)
    """Its hash fields (key, field) that exist now."""

    @property
    def existing(self) -> int:
        """How many of its keys exist now."""
        return sum(self.keys.values())


@dataclass
class _Purge:
    """What an attempt's purge did: each subject's problem and (keys, fields) removed."""

    subjects: list[_Subject]
    made: list[tuple[int, int]]
    unlinked: int = 0
    removed: int = 0


@dataclass
class _Answers:
    """What each UNLINK and HDEL of the effect answered, in the order they were sent."""

    unlinked: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)


@dataclass
class _Earlier:
    """Each subject's counts that earlier attempts of a batch heartbeated: what they removed,
    and what the last one was about to remove when its heartbeats stopped."""

    made: list[list[int]]
    planned: list[list[int]]

    @classmethod
    def of(cls, journal: Journal, size: int) -> _Earlier:
        """From the journal's earlier progress, for a batch of `size` subjects."""
        told = journal.earlier_progress.get(_PER_SUBJECT)
        told = told if isinstance(told, Mapping) else {}
        planned = _pairs(told.get("planned"), size) if journal.unconfirmed else _pairs(None, size)
        return cls(_pairs(told.get("made"), size), planned)

    def affected(self, index: int, made: tuple[int, int]) -> int:
        """What the step touched for subject `index`, at least (as `Journal.affected`)."""
        return sum(self.made[index]) + max(sum(made), sum(self.planned[index]))


def _pairs(value: object, size: int) -> list[list[int]]:
    """`size` (keys, fields) counts from a heartbeat, or zeros when it holds none that fit."""

    def count(n: object) -> bool:
        return isinstance(n, int) and not isinstance(n, bool) and n >= 0

    if not isinstance(value, list) or len(value) != size:
        return [[0, 0] for _ in range(size)]
    if all(isinstance(p, list) and len(p) == 2 and all(map(count, p)) for p in value):
        return [[int(n) for n in p] for p in value]
    return [[0, 0] for _ in range(size)]


class _GlobParts(NamedTuple):
    """A rendered glob read once: the literal bytes a key starts and ends with, and the test
    of what is between them."""

    prefix: bytes
    suffix: bytes
    middle: re.Pattern[bytes] | None
    """What the key holds between prefix and suffix must match this whole; None: anything."""


class _Globs:
    """A batch's rendered globs, each read once for all the passes over Redis (the purge and
    its verification). A glob is the literal text its keys start with, its middle (from its
    first glob character to its last) and the literal text they end with. The subject's
    values are most often in the prefix or the suffix (`patient:{subject_id}:*` ->
    `patient:<id>:`, `*`, ``; `{tenant}:*:{subject_id}` -> `<tenant>:`, `*`, `:<id>`), so the
    middle is the same for every subject: its regular expression is compiled once for them
    all, and none is needed when it is only `*`."""

    def __init__(self) -> None:
        """No glob read yet."""
        self._parts: dict[str, _GlobParts] = {}
        self._middles: dict[bytes, re.Pattern[bytes] | None] = {}

    def parts(self, glob: str) -> _GlobParts:
        """`glob`'s literal prefix and suffix, and the test of its middle."""
        known = self._parts.get(glob)
        if known is None:
            prefix, middle, suffix = glob_parts(glob)
            known = self._parts[glob] = _GlobParts(prefix, suffix, self._middle(middle))
        return known

    def _middle(self, middle: bytes) -> re.Pattern[bytes] | None:
        if middle not in self._middles:
            anything = middle != b"" and middle.strip(b"*") == b""
            self._middles[middle] = None if anything else re.compile(glob_regex(middle), re.DOTALL)
        return self._middles[middle]


class _Matcher:
    """One glob template rendered for every subject of a batch: one SCAN MATCH for them all
    (their common literal prefix), and the subjects whose glob matches a key, as Redis
    matches (byte-wise; `* ? [...] [^...] \\`): the key starts with the glob's literal prefix,
    ends with its literal suffix, and what is between matches the glob's middle. Subjects are
    looked up by the key's prefix, then its suffix: a key is tested against the middles of
    only the subjects whose prefix and suffix it has."""

    def __init__(self, owned: list[tuple[int, str]], globs: _Globs) -> None:
        """`owned`: (the subject's position in the batch, its rendered glob)."""
        parts = [globs.parts(glob) for _, glob in owned]
        first = owned[0][1]
        alike = all(glob == first for _, glob in owned)
        prefixes = [p.prefix.decode() for p in parts]
        self.match = first if alike else glob_escape(_common_prefix(prefixes)) + "*"
        self._by_prefix: dict[bytes, _Ends] = {}
        for (owner, _), part in zip(owned, parts, strict=True):
            self._by_prefix.setdefault(part.prefix, _Ends()).add(owner, part)
        self._lengths = sorted({len(prefix) for prefix in self._by_prefix})

    def owners(self, key: bytes) -> list[int]:
        """The subjects (positions) whose glob matches `key`."""
        size = len(key)
        found: list[int] = []
        for n in self._lengths:
            if n > size:
                break
            ends = self._by_prefix.get(key[:n])
            if ends is not None:
                ends.owners(key, n, found)
        return found


class _Ends:
    """The subjects of one literal prefix, by the literal suffix of their globs."""

    def __init__(self) -> None:
        """No subject yet."""
        self._by_suffix: dict[bytes, list[tuple[int, re.Pattern[bytes] | None]]] = {}
        self._lengths: list[int] = []

    def add(self, owner: int, part: _GlobParts) -> None:
        """Subject `owner`, whose glob is `part`."""
        if part.suffix not in self._by_suffix and len(part.suffix) not in self._lengths:
            self._lengths = sorted([*self._lengths, len(part.suffix)])
        self._by_suffix.setdefault(part.suffix, []).append((owner, part.middle))

    def owners(self, key: bytes, start: int, found: list[int]) -> None:
        """Add to `found` the subjects whose glob matches `key`, whose first `start` bytes
        are their prefix."""
        size = len(key)
        for m in self._lengths:
            end = size - m
            if end < start:
                break
            for owner, middle in self._by_suffix.get(key[end:], ()):
                if middle is None or middle.fullmatch(key, start, end):
                    found.append(owner)


def _items(batch: BatchStepRequest) -> list[tuple[str, Subject]]:
    """The batch's (subject_ref, subject), in its order."""
    return [(item.subject_ref, item.subject) for item in batch.subjects]


def _common_prefix(texts: list[str]) -> str:
    first, last = min(texts), max(texts)
    n = 0
    while n < len(first) and first[n] == last[n]:
        n += 1
    return first[:n]


def _raw(key: bytes | str) -> bytes:
    return key.encode() if isinstance(key, str) else key


def _left_detail(keys: int, fields: int) -> str:
    return (
        f"{keys} key(s) still match the patterns and {fields} hash field(s) remain after the purge"
    )


def _subject_outcome(
    ref: str, problem: LetheError | None, left: _Found, affected: int, detail: str
) -> SubjectOutcome:
    """One subject's verified outcome: `failed` with its problem, or with what is left."""
    if problem is not None:
        return SubjectOutcome(
            subject_ref=ref,
            status="failed",
            affected=affected,
            detail=f"{type(problem).__name__}: {problem}",
        )
    if left.existing or left.fields:
        return SubjectOutcome(
            subject_ref=ref,
            status="failed",
            affected=affected,
            detail=f"{detail}; {_left_detail(left.existing, len(left.fields))}",
        )
    return SubjectOutcome(
        subject_ref=ref, status="done", affected=affected, detail=f"{detail}; {_CLEAN}"
    )


def _subject_detail(journal: Journal, earlier: _Earlier, index: int, made: tuple[int, int]) -> str:
    """What the purge did for one subject of a batch, and what earlier attempts told of it."""
    done = f"unlinked {made[0]} key(s), removed {made[1]} hash field(s)"
    if journal.earlier == "lost":
        return (
            f"{done}; no heartbeat of an earlier attempt arrived, so what it removed, if "
            "anything, is not known"
        )
    keys, fields = earlier.planned[index]
    if keys or fields:
        return (
            f"{done}; an earlier attempt had found {keys} key(s) and {fields} hash field(s) "
            "and was about to remove them when its worker was lost"
        )
    keys, fields = earlier.made[index]
    if keys or fields:
        return f"{done} in this attempt; earlier attempts removed {keys} key(s), {fields} field(s)"
    return done
