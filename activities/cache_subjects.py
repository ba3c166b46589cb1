"""Tenant offboarding in a Redis cache: the subject ids read out of the keys the locator's
patterns name.

Only patterns with `{subject_id}` can tell a subject; the others (and hash fields) are left to
the subjects found elsewhere. Each such template is rendered for the tenant first (`{tenant}`,
glob-escaped) and becomes a SCAN glob (`{subject_id}` and `{identity.NAME}` as `?*`,
`{subject_ref}` as 32 hex digits) and a regular expression that a key must match exactly: the
template's own text as Redis matches it, the tenant literally, the subject id captured (the
shortest that fits, so that the erasure of the subject found matches the key), an identity as
any text, and a subject reference only when it is the tenant's reference of the id captured.
Keys matching no template that way, or not UTF-8, or whose id no `Subject` can hold, are
skipped (counted in the log, never shown).

Pages: `after` is the SCAN cursor where the previous page stopped (`None`: start), and
`next_after` the cursor to go on from (`None`: the scan went round). Not the subject id, as the
contract's pages by SQL are: a keyspace has no order by subject id, and SCAN walks it once, so a
page is a run of SCAN calls, one pass through the keyspace over all pages. A page stops once it
holds `limit` subjects (it may hold a few more: a SCAN call's keys are taken whole) or after
`MAX_SCAN_CALLS` calls, so a page can also hold none and still have a next. SCAN guarantees every
key present for the whole scan is returned at least once, not exactly once, and a subject's
keys may fall on different pages: a subject may come again on a later page, and the caller
keeps each subject once. Within a page, each subject comes once, in id order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from lethe.activities.cache import SCAN_COUNT, glob_escape
from lethe.activities.clients import Clients
from lethe.activities.connector import UnsupportedStep
from lethe.activities.driver_errors import DriverRefused, translated
from lethe.activities.redis_glob import glob_regex, literal_prefix
from lethe.activities.subject_pages import check_tenant, found_subject, log_left_out
from lethe.classification.datamap import RedisLocator
from lethe.contracts import Subject, SubjectsPage, SubjectsQuery
from lethe.kernel.config import connection
from lethe.kernel.errors import LetheError
from lethe.kernel.subjects import tag_for

MAX_SCAN_CALLS = 100
"""SCAN calls one page makes at most (about 100,000 slots of the keyspace): a page stays short
where the tenant's keys are few among many."""
_FIELD = re.compile(r"\{([^{}]*)\}")
_GLOB_SPECIAL = frozenset("*?[\\")


class InvalidCursor(LetheError):
    """The page's `after` is not a SCAN cursor (a Redis page goes on from a cursor)."""


@dataclass(frozen=True)
class KeyTemplate:
    """One pattern of the locator, rendered for a tenant: how to scan for its keys and how to
    read the subject id out of one."""

    glob: str
    """The SCAN glob: the tenant rendered, every other field a wildcard."""
    regex: re.Pattern[bytes]
    """Matches (whole) exactly the keys the template names, the id in group `id`."""
    by_ref: bool
    """The template has `{subject_ref}`: a key is the tenant's only when it holds the tenant's
    reference of the id read (group `ref`)."""


async def redis_subjects(clients: Clients, query: SubjectsQuery) -> SubjectsPage:
    """One page of the subjects of `query.tenant` whose keys the step's patterns name: a run of
    SCAN calls from the cursor `query.after`; `next_after` is the cursor to go on from."""
    locator = _locator(query)
    check_tenant(query.tenant)
    cursor = _cursor(query.after)
    templates = key_templates(locator, query.tenant)
    if not templates:
        return SubjectsPage(subjects=[])
    url = connection(query.step.connection).get_secret_value()
    client = clients.redis(url)
    ref_key = _ref_key() if any(t.by_ref for t in templates) else None
    match = scan_glob(templates)
    found: dict[str, Subject] = {}
    skipped = 0
    async with translated(f"Redis at {_where(url)}", DriverRefused):
        for _ in range(MAX_SCAN_CALLS):
            count = min(SCAN_COUNT, max(query.limit - len(found), 10))
            cursor, keys = await client.scan(cursor, match=match, count=count)
            for key in keys:
                subject_id = subject_of(templates, _raw(key), query.tenant, ref_key)
                if subject_id is None or subject_id in found:
                    continue
                subject = found_subject(query.tenant, subject_id)
                if subject is None:
                    skipped += 1
                    continue
                found[subject_id] = subject
            if cursor == 0 or len(found) >= query.limit:
                break
    log_left_out(query.step.system, "its keys", skipped)
    return SubjectsPage(
        subjects=[found[i] for i in sorted(found)],
        next_after=str(cursor) if cursor != 0 else None,
    )


def _locator(query: SubjectsQuery) -> RedisLocator:
    step = query.step
    if step.kind != "redis" or not isinstance(step.locator, RedisLocator):
        raise UnsupportedStep(
            f"step {step.id} is a {step.kind} step; Redis subjects are read from redis steps only"
        )
    return step.locator


def _cursor(after: str | None) -> int:
    if after is None:
        return 0
    if not re.fullmatch(r"[0-9]{1,20}", after):
        raise InvalidCursor(
            "a Redis page goes on from the SCAN cursor the previous page gave (next_after), "
            "which this is not"
        )
    return int(after)


def key_templates(locator: RedisLocator, tenant: str) -> list[KeyTemplate]:
    """The locator's patterns that name the subject id, rendered for `tenant`."""
    return [key_template(p, tenant) for p in locator.patterns if "{subject_id}" in p]


def key_template(template: str, tenant: str) -> KeyTemplate:
    """A pattern with `{subject_id}`, rendered for `tenant`."""
    glob: list[str] = []
    regex: list[bytes] = []
    seen: set[str] = set()
    for index, part in enumerate(_FIELD.split(template)):
        if index % 2 == 0:
            glob.append(part)
            regex.append(glob_regex(part))
        elif part == "tenant":
            glob.append(glob_escape(tenant))
            regex.append(re.escape(tenant.encode()))
        elif part in ("subject_id", "subject_ref"):
            group = "id" if part == "subject_id" else "ref"
            glob.append("?*" if part == "subject_id" else "[0-9a-f]" * 32)
            what = b".+?" if part == "subject_id" else b"[0-9a-f]{32}"
            regex.append(
                b"(?P=" + group.encode() + b")"
                if part in seen
                else b"(?P<" + group.encode() + b">" + what + b")"
            )
            seen.add(part)
        else:  # an identity: any text, which the subject found carries or not
            glob.append("?*")
            regex.append(b".+?")
    return KeyTemplate(
        glob="".join(glob),
        regex=re.compile(b"".join(regex), re.DOTALL),
        by_ref="subject_ref" in seen,
    )


def scan_glob(templates: list[KeyTemplate]) -> str | None:
    """What SCAN matches: the one template's glob, or the literal text every template's keys
    start with (None when there is none: the whole keyspace)."""
    if len(templates) == 1:
        return templates[0].glob
    prefixes = [literal_prefix(t.glob) for t in templates]
    first, last = min(prefixes), max(prefixes)
    n = 0
    while n < len(first) and first[n] == last[n]:
        n += 1
    return glob_escape(first[:n]) + "*" if n else None


def subject_of(
    templates: list[KeyTemplate], key: bytes, tenant: str, ref_key: bytes | None
) -> str | None:
    """The subject id `key` names under the first template it matches exactly; None when it
    matches none (or is not UTF-8)."""
    for template in templates:
        found = template.regex.fullmatch(key)
        if found is None:
            continue
        try:
            subject_id = found.group("id").decode()
        except UnicodeDecodeError:
            continue
        if template.by_ref and (
            ref_key is None or found.group("ref").decode() != tag_for(tenant, subject_id, ref_key)
        ):
            continue
        return subject_id
    return None


def _ref_key() -> bytes:
    # Only here: the rest needs no settings.
    from lethe.kernel.config import current_settings

    return current_settings().subject_key_bytes


def _raw(key: Any) -> bytes:
    return key.encode() if isinstance(key, str) else bytes(key)


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"
