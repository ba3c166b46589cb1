"""The log connector: drops or redacts a subject's records in JSON-lines log blobs.

Logs are block blobs of one JSON object per line, in a container under a prefix. A record is
the subject's when one of the locator's `fields` holds the subject's value for it and, where the
locator names a `tenant_field` (a logs system that holds several tenants must), that field holds
the subject's tenant: another tenant's subject with the same id is left byte for byte, and a
record with the subject's values but no tenant is left too, and makes verify fail, since whose
it is cannot be told. Each blob that holds such a record is rewritten as a whole and swapped in
only if nobody wrote to it since it was read (an If-Match on its etag); a concurrent writer
makes the swap fail, and the blob is read again and rewritten, so their lines are never lost.

A rewritten blob carries metadata naming the request and the step, and how many records they
dropped or redacted in it (`lethe_request`, `lethe_step`, `lethe_records`; no personal data);
a bulk request's batch is named `<request>#<batch>`, and its subjects' counts are in
`lethe_subjects` by their positions in the batch. A batch is the same code as one subject: each
blob is read and rewritten once for all of the batch's subjects.
After a lost worker, the retry resumes after the last blob an earlier attempt's heartbeat says
it finished, and a blob rewritten after that heartbeat (or with no heartbeat at all) is known by
its metadata: its records count as the earlier attempt's, and it is not rewritten again.

Preflight reads only: the container, the credentials and what they allow, that the request
gives a value to find records by, and, with a `tenant_field`, that the first log blob's records
carry it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from azure.core import MatchConditions
from azure.core.exceptions import (
    HttpResponseError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.storage.blob import BlobProperties, BlobType, ContentSettings
from azure.storage.blob.aio import BlobClient, ContainerClient

from lethe.activities.attempts import Journal
from lethe.activities.blob import (
    PREFLIGHT_TIMEOUT_SECONDS,
    BlobConnector,
    batch_of_one,
    counts_of,
    sas_problems,
)
from lethe.activities.common import verdict
from lethe.activities.driver_errors import service_code
from lethe.classification.datamap import LogLocator, MissingIdentity
from lethe.contracts import (
    BatchStepOutcome,
    BatchStepRequest,
    BulkSubject,
    Evidence,
    StepOutcome,
    StepRequest,
    SubjectOutcome,
    SweepBatch,
    SweepResult,
)
from lethe.kernel.errors import LetheError

REDACTED = "[redacted]"
MARK_REQUEST, MARK_STEP, MARK_RECORDS = "lethe_request", "lethe_step", "lethe_records"
"""The metadata of a rewritten blob: the request (or `<request>#<batch>`) and step that rewrote
it, and how many of the subjects' records they dropped or redacted in it."""
MARK_SUBJECTS = "lethe_subjects"
"""A batch's rewritten blob: how many records of each subject, `position:count,...` by their
positions in the batch (no references, no values); a batch of one needs none."""
MARK_SUBJECTS_CHARS = 4096
"""The most MARK_SUBJECTS may take of a blob's metadata (8 KiB in all, on Azure); past it the
blob carries the batch's count only."""
SAMPLE_BYTES = 64 * 1024
"""How much of the first log blob preflight reads to see that records carry the tenant field."""
ATTEMPTS = 5
"""How many times one blob is read and swapped before a busy writer makes the step retry."""
Mode = Literal["drop", "redact"]
_MODES: dict[str, Mode] = {
    "delete": "drop",
    "purge": "drop",
    "redact": "redact",
    "anonymize": "redact",
}


class LogBlobBusy(LetheError):
    """A log blob kept changing between read and write; the activity retries later."""

    retryable = True


@dataclass(frozen=True)
class Rewrite:
    """One blob's content after dropping or redacting the records of a batch's subjects."""

    content: bytes
    matched: int
    """Records of the subjects that were dropped or redacted."""
    unparsed: int
    """Lines that are not a JSON object, kept unchanged."""
    redacted: int = 0
    """Records left alone whose mapped fields already say `[redacted]` (of a subject's tenant,
    where there is a tenant field)."""
    records: int = 0
    """Lines that are JSON objects. None in a non-empty blob: it could not be checked."""
    untenanted: int = 0
    """Records with a subject's values but no tenant in the tenant field: left alone, since
    whose they are cannot be told."""
    each: Mapping[int, int] = field(default_factory=dict)
    """Subject (index in the batch) -> their records matched; a record that carries two
    subjects' values counts for both."""
    untenanted_each: Mapping[int, int] = field(default_factory=dict)
    """Subject -> the untenanted records that carry their values."""

    def unreadable(self, content: bytes) -> bool:
        """The blob holds something, but no JSON record (compressed, or another format)."""
        return not self.records and bool(content.strip())


@dataclass
class _Progress:
    """Counts so far; heartbeated with the last blob done, to resume after."""

    last_done: str | None = None
    """A digest of the last blob's name (names may say whose a log is: they stay out of
    heartbeats)."""
    affected: int = 0
    scanned: int = 0
    rewritten: int = 0
    unparsed: int = 0
    conflicts: int = 0
    not_rewritable: int = 0
    unreadable: int = 0
    untenanted: int = 0
    earlier_rewritten: int = 0
    """Blobs an earlier attempt rewrote after its last heartbeat that arrived (their metadata)."""
    earlier_records: int = 0
    unattributed: int = 0
    """Records an earlier attempt's marks count for the batch but not per subject (the per-subject
    counts did not fit the blob's metadata)."""
    each: list[int] = field(default_factory=list)
    """Each subject's records dropped or redacted, by their position in the batch."""

    @classmethod
    def resumed(cls, journal: Journal, size: int) -> _Progress:
        """The progress an earlier attempt of this activity heartbeated, or a fresh start, for
        a batch of `size` subjects."""
        saved = journal.earlier_progress.get("progress")
        if not isinstance(saved, Mapping):
            return cls(each=[0] * size)
        known = {f.name for f in fields(cls)} - {"each", "last_done"}
        values: dict[str, Any] = {
            k: v
            for k, v in saved.items()
            if k in known and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        }
        last = saved.get("last_done")
        each = counts_of(saved.get("each"), size)
        return cls(**values, last_done=last if isinstance(last, str) else None, each=each)

    def add(self, counts: Mapping[int, int]) -> None:
        """Count records of each subject."""
        for index, n in counts.items():
            self.each[index] += n


def subject_values(request: StepRequest | BulkSubject, locator: LogLocator) -> dict[str, str]:
    """Log field -> the subject's value in it, for the fields whose value the request gives."""
    available = request.subject.template_values(request.subject_ref)
    values = {name: available[src] for name, src in locator.fields.items() if src in available}
    if not values:
        needed = ", ".join(sorted(set(locator.fields.values())))
        raise MissingIdentity(
            f"the log locator in container {locator.container!r} finds records by {needed}; "
            "the request gives none of them"
        )
    return values


def rewrite(content: bytes, finder: _Finder, mode: Mode) -> Rewrite:
    """Drop (or redact the finder's fields of) the records where a field holds a subject's value
    and, when the finder has a tenant field, that field holds that subject's tenant.

    Every other line, JSON or not, is kept byte for byte (another tenant's record with the same
    values too; one without a tenant is kept and counted as `untenanted`).
    """
    out: list[bytes] = []
    matched = unparsed = redacted = records = untenanted = 0
    each: dict[int, int] = {}
    untenanted_each: dict[int, int] = {}
    for line in content.split(b"\n"):
        record = json_record(line)
        if record is None:
            unparsed += bool(line.strip())
            out.append(line)
            continue
        records += 1
        hits = finder.hits(record)
        if not hits:
            redacted += finder.in_tenants(record) and any(
                record.get(name) == REDACTED for name in finder.fields
            )
            out.append(line)
            continue
        ours = finder.theirs(record, hits)
        if not ours:
            if finder.tenant_field is not None and not isinstance(
                record.get(finder.tenant_field), str
            ):
                untenanted += 1
                _count(untenanted_each, hits)
            out.append(line)
            continue
        matched += 1
        _count(each, ours)
        if mode == "redact":
            for name in finder.fields:
                if name in record:
                    record[name] = REDACTED
            ending = b"\r" if line.endswith(b"\r") else b""
            out.append(json.dumps(record, ensure_ascii=False).encode() + ending)
    return Rewrite(
        b"\n".join(out) if matched else content,
        matched,
        unparsed,
        redacted,
        records,
        untenanted,
        each,
        untenanted_each,
    )


def _count(into: dict[int, int], indexes: Iterable[int]) -> None:
    for index in indexes:
        into[index] = into.get(index, 0) + 1


def json_record(line: bytes) -> dict[str, Any] | None:
    """The line as a JSON object; None for a blank line, or one that is not a JSON object."""
    if not line.strip():
        return None
    try:
        parsed = json.loads(line)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def field_text(value: object) -> str | None:
    """A record's scalar as the text it is compared by (an id logged as a number is still the
    id); None for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


@dataclass(frozen=True)
class _Finder:
    """How the step finds a batch's records: each log field's values -> the subjects (their
    positions in the batch) with that value, the fields to redact, the tenant field, and each
    subject's tenant. One subject is a batch of one."""

    values: dict[str, dict[str, tuple[int, ...]]]
    fields: list[str]
    tenant_field: str | None
    tenants: tuple[str, ...]
    unfindable: dict[int, str] = field(default_factory=dict)
    """Subject -> why the request gives no value to find their records by (a batch of more
    than one: alone, the error is raised)."""

    @classmethod
    def of(cls, batch: BatchStepRequest, locator: LogLocator) -> _Finder:
        found: dict[str, dict[str, list[int]]] = {}
        unfindable: dict[int, str] = {}
        for index, item in enumerate(batch.subjects):
            try:
                theirs = subject_values(item, locator)
            except MissingIdentity as exc:
                if len(batch.subjects) == 1:
                    raise
                unfindable[index] = str(exc)
                continue
            for name, value in theirs.items():
                found.setdefault(name, {}).setdefault(value, []).append(index)
        return cls(
            {name: {v: tuple(ix) for v, ix in by.items()} for name, by in found.items()},
            list(locator.fields),
            locator.tenant_field,
            tuple(item.subject.tenant for item in batch.subjects),
            unfindable,
        )

    def hits(self, record: Mapping[str, Any]) -> list[int]:
        """The subjects one of whose values a field of `record` holds, whatever its tenant."""
        found: list[int] = []
        for name, by_value in self.values.items():
            text = field_text(record.get(name))
            if text is not None:
                found.extend(by_value.get(text, ()))
        return list(dict.fromkeys(found))

    def theirs(self, record: Mapping[str, Any], hits: list[int]) -> list[int]:
        """Of `hits`, the subjects whose tenant the record's tenant field holds (all of them
        without a tenant field)."""
        if self.tenant_field is None:
            return hits
        owner = record.get(self.tenant_field)
        return [index for index in hits if self.tenants[index] == owner]

    def in_tenants(self, record: Mapping[str, Any]) -> bool:
        """The record is of a tenant of the batch (any record, without a tenant field)."""
        if self.tenant_field is None:
            return True
        owner = record.get(self.tenant_field)
        return isinstance(owner, str) and owner in self.tenants

    def rewrite(self, content: bytes, mode: Mode) -> Rewrite:
        return rewrite(content, self, mode)


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:32]


def _resume_at(names: list[str], last_done: str | None) -> int | None:
    """Where to go on in `names` after the blob whose digest is `last_done`: 0 for a fresh
    start, None when no blob has that digest any more."""
    if last_done is None:
        return 0
    for index, name in enumerate(names):
        if _digest(name) == last_done:
            return index + 1
    return None


def marked_count(
    metadata: Mapping[str, str] | None, marks: Mapping[str, str], count: str
) -> int | None:
    """The number under `count` in a blob's metadata (0 when it is not one) if the blob carries
    every one of `marks`; None when it does not (it was not rewritten by them, or since)."""
    found = {k.lower(): v for k, v in (metadata or {}).items()}
    if any(found.get(name) != value for name, value in marks.items()):
        return None
    number = found.get(count, "")
    return int(number) if number.isdigit() else 0


def with_marks(metadata: Mapping[str, str] | None, marks: Mapping[str, str]) -> dict[str, str]:
    """The blob's metadata with `marks` (lower-case names) in place of any earlier ones."""
    kept = {k: v for k, v in (metadata or {}).items() if k.lower() not in marks}
    return {**kept, **marks}


def _marks(journal: Journal) -> dict[str, str]:
    """The marks of a blob this journal's step rewrote (with MARK_RECORDS, how many records):
    the request's id, or for a bulk request's batch `<request>#<batch>`."""
    return {MARK_REQUEST: journal.request_id, MARK_STEP: journal.step_id}


def _subjects_mark(counts: Mapping[int, int]) -> str | None:
    """Per-subject counts as a blob's MARK_SUBJECTS (`position:count,...`); None when they do
    not fit MARK_SUBJECTS_CHARS."""
    text = ",".join(f"{index}:{n}" for index, n in sorted(counts.items()) if n)
    return text if len(text) <= MARK_SUBJECTS_CHARS else None


def _marked_each(
    metadata: Mapping[str, str] | None, size: int, total: int
) -> dict[int, int] | None:
    """The per-subject counts a blob's marks hold: all of `total` for a batch of one; None when
    a batch's blob does not say."""
    if size == 1:
        return {0: total}
    found = {k.lower(): v for k, v in (metadata or {}).items()}.get(MARK_SUBJECTS)
    if found is None:
        return None
    counts: dict[int, int] = {}
    for part in found.split(","):
        index, _, n = part.partition(":")
        if index.isdigit() and n.isdigit() and int(index) < size:
            counts[int(index)] = counts.get(int(index), 0) + int(n)
    return counts


async def read_blob(blob: BlobClient) -> tuple[bytes, str, BlobProperties] | None:
    """The blob's content, etag and properties; None when it no longer exists (a missing
    container raises)."""
    try:
        download = await blob.download_blob()
        content = await download.readall()
    except ResourceNotFoundError as exc:
        if service_code(exc) == "ContainerNotFound":
            raise
        return None
    return content, download.properties.etag, download.properties


async def swap_blob(
    blob: BlobClient,
    content: bytes,
    etag: str,
    properties: BlobProperties,
    metadata: dict[str, str],
) -> None:
    """Replace the blob by a block blob of `content` with `metadata`, only if it is still at
    `etag` (else ResourceModifiedError); its content settings and tags stay."""
    settings = properties.content_settings
    await blob.upload_blob(
        content,
        blob_type=BlobType.BLOCKBLOB,
        overwrite=True,
        etag=etag,
        match_condition=MatchConditions.IfNotModified,
        content_settings=ContentSettings(
            content_type=settings.content_type,
            content_encoding=settings.content_encoding,
            content_language=settings.content_language,
            content_disposition=settings.content_disposition,
            cache_control=settings.cache_control,
        ),
        metadata=metadata,
        tags=await blob.get_blob_tags() if properties.tag_count else None,
    )


def _batch_id(batch: BatchStepRequest) -> str:
    """The journal's and the marks' name of a bulk request's batch."""
    return f"{batch.request_id}#{batch.batch}"


def _add(into: dict[int, int], counts: Mapping[int, int]) -> None:
    for index, n in counts.items():
        into[index] = into.get(index, 0) + n


def _rewritten_metadata(
    metadata: Mapping[str, str] | None, marks: dict[str, str], each: dict[int, int], size: int
) -> dict[str, str]:
    """A rewritten blob's metadata: its own, the step's `marks` (with the records it lost) and,
    for a batch of more than one, each subject's count where they fit."""
    kept = {k: v for k, v in (metadata or {}).items() if k.lower() != MARK_SUBJECTS}
    subjects = _subjects_mark(each) if size > 1 else None
    return with_marks(kept, {**marks, MARK_SUBJECTS: subjects} if subjects is not None else marks)


@dataclass
class _Run:
    """What an erase did for a batch: its progress, where it resumed, what it was told."""

    batch: BatchStepRequest
    attempt: int
    finder: _Finder
    mode: Mode
    progress: _Progress
    resumed_from: int
    recorded: tuple[int, int] | None
    """The records and blobs the earlier attempts' last heartbeat that arrived counted."""

    def detail(self) -> str:
        if not self.progress.not_rewritable:
            return ""
        return (
            f"{self.progress.not_rewritable} append or page blob(s) hold the subject's records; "
            "only block blobs can be rewritten atomically, so they were left unchanged"
        )

    def evidence(self) -> Evidence:
        """The erase's counts (no names, no values); on a retry, the earlier attempts' too."""
        progress, mode = self.progress, self.mode
        records = "records_dropped" if mode == "drop" else "records_redacted"
        evidence: Evidence = {
            "action": self.batch.step.action,
            "blobs_scanned": progress.scanned,
            "blobs_rewritten": progress.rewritten,
            records: progress.affected,
            "unparsed_lines": progress.unparsed,
            "write_conflicts_retried": progress.conflicts,
            "blobs_not_rewritable": progress.not_rewritable,
            "blobs_without_json": progress.unreadable,
            "resumed_from_blob": self.resumed_from,
        }
        if self.finder.tenant_field is not None:
            evidence["records_without_tenant"] = progress.untenanted
        if len(self.batch.subjects) > 1:
            evidence["subjects"] = len(self.batch.subjects)
            evidence["subjects_unfindable"] = len(self.finder.unfindable)
            evidence["records_unattributed"] = progress.unattributed
        if self.attempt > 1 or self.recorded is not None or progress.earlier_rewritten:
            # The blobs an earlier attempt finished are in its heartbeat; those it rewrote
            # after that heartbeat (or with none arriving) say so in their marks.
            records_then, blobs_then = self.recorded or (0, 0)
            earlier_records = records_then + progress.earlier_records
            evidence.update(
                {
                    "first_attempt_evidence": "blob metadata"
                    if self.recorded is None
                    else "recorded",
                    "earlier_attempts": self.attempt - 1,
                    "earlier_blobs_rewritten": blobs_then + progress.earlier_rewritten,
                    f"earlier_{records}": earlier_records,
                    f"retry_{records}": progress.affected - earlier_records,
                }
            )
        return evidence


@dataclass
class _Checked:
    """What a rescan found, for the batch and for each subject."""

    tenant_field: str | None
    unfindable: dict[int, str]
    size: int
    blobs: int = 0
    matching: int = 0
    unparsed: int = 0
    redacted: int = 0
    unreadable: int = 0
    untenanted: int = 0
    matching_each: dict[int, int] = field(default_factory=dict)
    untenanted_each: dict[int, int] = field(default_factory=dict)

    def add(self, found: Rewrite, content: bytes) -> None:
        self.blobs += 1
        self.matching += found.matched
        self.unparsed += found.unparsed
        self.redacted += found.redacted
        self.unreadable += found.unreadable(content)
        self.untenanted += found.untenanted
        _add(self.matching_each, found.each)
        _add(self.untenanted_each, found.untenanted_each)

    def evidence(self) -> Evidence:
        evidence: Evidence = {
            "blobs_scanned": self.blobs,
            "records_matching": self.matching,
            "unparsed_lines": self.unparsed,
            "records_redacted_present": self.redacted,
            "blobs_without_json": self.unreadable,
        }
        if self.tenant_field is not None:
            evidence["records_without_tenant"] = self.untenanted
        return evidence

    def problems(self, index: int) -> list[str]:
        """Why the subject at `index` is not provably erased; none when they are."""
        problems = [why for why in (self.unfindable.get(index),) if why]
        matching = self.matching_each.get(index, 0)
        if matching:
            problems.append(f"{matching} log record(s) still carry the subject's values")
        untenanted = self.untenanted_each.get(index, 0)
        if untenanted:
            problems.append(
                f"{untenanted} log record(s) carry the subject's values but no tenant in "
                f"{self.tenant_field!r}, so whose they are cannot be told; they were left"
            )
        if self.unreadable:
            problems.append(
                f"{self.unreadable} blob(s) under the prefix hold no JSON lines (compressed, or "
                "another format), so they could not be checked"
            )
        return problems


class LogRedactor(BlobConnector[LogLocator]):
    """Drops (`delete`) or redacts (`redact`, `anonymize`) a subject's records in log blobs.

    Blobs are taken in name order; after each one the activity heartbeats the name of the last
    blob done and its counts, and a retried attempt resumes after it. Blobs without the
    subject's records are read but never rewritten; a rewritten one carries the step's marks.
    Only block blobs can be swapped whole: an append or page blob holding the subject's records
    is counted and makes the step `failed`.

    A batch of subjects (`erase_batch`, bulk erasure) takes the same code as one subject (a
    batch of one): one finder matches a record of any subject of the batch (in their tenant),
    so each blob is read once and, holding any of their records, rewritten once, its marks
    naming the batch (`<request>#<batch>`) with each subject's count (MARK_SUBJECTS). Verify
    reads each blob once more for the whole batch; outcomes are per subject.

    Preflight's container and tenant-field checks, once they passed, are kept for the worker
    for a short time (`blob_checks`); a problem is asked afresh each time.
    """

    kind = "logs"
    locator_model = LogLocator
    actions = ("delete", "redact", "purge", "anonymize")
    batching = (
        "each log blob read and rewritten once for the whole batch, with each subject's count "
        "in its marks"
    )
    checks = (
        "a value to find records by; the container exists and listing under the prefix works; "
        "the signature allows read, list and write; with tenant_field, records carry it"
    )
    proves = "no record of the subject is left in any log blob under the prefix"
    retries = (
        "each rewritten blob's lethe_request, lethe_step and lethe_records metadata "
        "(and a batch's lethe_subjects)"
    )
    sweeps = "each log blob rewritten without its lines past the period (If-Match), the rest as is"

    async def preflight(self, request: StepRequest) -> list[str]:
        """Touching nothing: the action is one logs take, the request gives a value to find
        records by, what the connection's signature allows, the container exists and the
        credentials open it, listing under the prefix works, and with a `tenant_field` the
        first log blob's records carry it."""
        locator = self.locator(request)
        system = request.step.system
        problems: list[str] = []
        try:
            subject_values(request, locator)
        except MissingIdentity as exc:
            problems.append(f"logs system {system!r}: {exc}")
        needs = {"r": "read", "l": "list", "w": "write"}
        problems += sas_problems(self._connection, system, needs, kind="logs")
        found = await self.container_problems(
            system, locator.container, [locator.prefix], kind="logs"
        )
        problems += found
        if not found and locator.tenant_field is not None:
            key = ("logs-tenant", locator.container, system, locator.prefix, locator.tenant_field)
            problems += await self._checks.problems(key, lambda: self._tenant_problems(request))
        return problems

    async def erase(self, request: StepRequest) -> StepOutcome:
        """Drop or redact the subject's records in every log blob under the prefix: the batch
        code with a batch of one, under the request's own journal and marks."""
        run = await self._erase(batch_of_one(request), Journal.resume(request))
        return StepOutcome(
            step_id=request.step.id,
            status="failed" if run.progress.not_rewritable else "running",
            affected=run.progress.affected,
            evidence=run.evidence(),
            detail=run.detail(),
        )

    async def verify(self, request: StepRequest, erased: StepOutcome) -> StepOutcome:
        """Rescan every log blob: no record may still carry the subject's values (in their
        tenant), and none may carry them without a tenant where the locator names one."""
        # Within the erase activity, verify's heartbeats keep erase's record for a retry.
        journal = Journal.current(request) or Journal(request.request_id, request.step.id)
        checked = await self._check(batch_of_one(request), journal)
        problems = checked.problems(0)
        if problems and erased.detail:
            problems.append(erased.detail)
        return verdict(erased, checked.evidence(), problems)

    async def erase_batch(self, batch: BatchStepRequest) -> BatchStepOutcome:
        """Drop or redact a batch's records: each log blob read once and, holding any of
        theirs, rewritten once (If-Match) with the batch's marks and per-subject counts; then
        verify, reading each blob once more. One journal a batch."""
        run = await self._erase(batch, Journal.resume(batch))
        journal = Journal.current(batch) or Journal(_batch_id(batch), batch.step.id)
        checked = await self._check(batch, journal)
        outcomes = []
        for index, item in enumerate(batch.subjects):
            problems = checked.problems(index)
            if problems and run.detail():
                problems.append(run.detail())
            outcomes.append(
                SubjectOutcome(
                    subject_ref=item.subject_ref,
                    status="failed" if problems else "done",
                    affected=run.progress.each[index],
                    detail="; ".join(problems),
                )
            )
        return BatchStepOutcome(
            step_id=batch.step.id,
            outcomes=outcomes,
            evidence={**run.evidence(), **checked.evidence()},
            detail=run.detail(),
        )

    async def verify_batch(
        self, batch: BatchStepRequest, erased: BatchStepOutcome
    ) -> BatchStepOutcome:
        """Rescan every log blob once for the whole batch: per subject, no record may still
        carry their values (in their tenant), nor carry them without a tenant."""
        journal = Journal.current(batch) or Journal(_batch_id(batch), batch.step.id)
        checked = await self._check(batch, journal)
        before = {outcome.subject_ref: outcome for outcome in erased.outcomes}
        outcomes = []
        for index, item in enumerate(batch.subjects):
            was = before.get(item.subject_ref)
            problems = checked.problems(index)
            if problems and erased.detail:
                problems.append(erased.detail)
            outcomes.append(
                SubjectOutcome(
                    subject_ref=item.subject_ref,
                    status="failed" if problems else "done",
                    affected=was.affected if was else 0,
                    detail="; ".join(problems),
                )
            )
        return BatchStepOutcome(
            step_id=batch.step.id, outcomes=outcomes, evidence=checked.evidence()
        )

    async def sweep(self, batch: SweepBatch) -> SweepResult:
        """One batch of a retention sweep: the lines past their period dropped from a few log
        blobs, those under an obligation or a hold kept (`lethe.activities.logs_retention`)."""
        from lethe.activities.logs_retention import sweep_logs  # it imports this module

        return await sweep_logs(self._service, self._endpoint, batch)

    # --- a batch (one subject is a batch of one) ---------------------------------------------

    async def _erase(self, batch: BatchStepRequest, journal: Journal) -> _Run:
        """The effect for a batch: each blob under the prefix read once, in name order, from
        where an earlier attempt's heartbeat says it finished, and rewritten once if it holds
        any of the batch's records; the journal's progress heartbeated after each blob."""
        locator = self.locator(batch)
        mode = _MODES[batch.step.action]
        finder = _Finder.of(batch, locator)
        size = len(batch.subjects)
        progress = _Progress.resumed(journal, size)
        # What the earlier attempts' last heartbeat that arrived counts (blobs it finished).
        recorded = (progress.affected, progress.rewritten) if progress.last_done else None
        marks = _marks(journal)
        with self._errors(batch, locator):
            container = self._service.get_container_client(locator.container)
            names = await self._blob_names(container, locator)
            resumed_from = _resume_at(names, progress.last_done)
            if resumed_from is None:  # that blob is gone: read every blob again, count afresh
                resumed_from, progress, recorded = 0, _Progress(each=[0] * size), None
            for name in names[resumed_from:]:
                blob = container.get_blob_client(name)
                await self._erase_blob(blob, marks, finder, mode, progress)
                progress.last_done = _digest(name)
                journal.progress["progress"] = asdict(progress)
                journal.beat()
        return _Run(batch, journal.attempt, finder, mode, progress, resumed_from, recorded)

    async def _check(self, batch: BatchStepRequest, journal: Journal) -> _Checked:
        """Every blob under the prefix read once: what still carries each subject's values."""
        locator = self.locator(batch)
        finder = _Finder.of(batch, locator)
        checked = _Checked(locator.tenant_field, finder.unfindable, len(batch.subjects))
        with self._errors(batch, locator):
            container = self._service.get_container_client(locator.container)
            for index, name in enumerate(await self._blob_names(container, locator)):
                read = await read_blob(container.get_blob_client(name))
                if read is not None:
                    checked.add(finder.rewrite(read[0], "drop"), read[0])
                journal.alive(verified_blobs=index + 1)
        return checked

    # --- one blob ------------------------------------------------------------------------------

    async def _erase_blob(
        self,
        blob: BlobClient,
        marks: dict[str, str],
        finder: _Finder,
        mode: Mode,
        progress: _Progress,
    ) -> None:
        """The effect on one blob: rewrite it without the batch's records, with the step's
        marks and (for more than one subject) per-subject counts; a blob the step rewrote
        before (its marks say so) counts as rewritten."""
        earlier: int | None = None
        earlier_each: dict[int, int] = {}
        for attempt in range(ATTEMPTS):
            read = await self._read(blob)
            if read is None:  # deleted since it was listed: nothing of the subjects' is left
                return
            content, etag, properties = read
            result = finder.rewrite(content, mode)
            if attempt == 0:
                progress.scanned += 1
                progress.unparsed += result.unparsed
                progress.unreadable += result.unreadable(content)
                progress.untenanted += result.untenanted
                earlier = marked_count(properties.metadata, marks, MARK_RECORDS)
                if earlier is not None:  # rewritten by an earlier attempt of this step
                    earlier_each = self._earlier_blob(properties, earlier, progress)
            if not result.matched:
                return
            if properties.blob_type != BlobType.BLOCKBLOB:
                progress.not_rewritable += 1
                return
            each = dict(earlier_each)
            _add(each, result.each)
            try:
                await swap_blob(
                    blob,
                    result.content,
                    etag,
                    properties,
                    _rewritten_metadata(
                        properties.metadata,
                        {**marks, MARK_RECORDS: str((earlier or 0) + result.matched)},
                        each,
                        len(progress.each),
                    ),
                )
            except ResourceModifiedError:
                progress.conflicts += 1
                continue
            progress.affected += result.matched
            progress.add(result.each)
            progress.rewritten += earlier is None
            return
        raise LogBlobBusy(
            f"a log blob changed {ATTEMPTS} times while it was being rewritten; "
            "the step will run again"
        )

    def _earlier_blob(
        self, properties: BlobProperties, earlier: int, progress: _Progress
    ) -> dict[int, int]:
        """Count a blob an earlier attempt rewrote (by its marks); its per-subject counts."""
        progress.earlier_rewritten += 1
        progress.earlier_records += earlier
        progress.affected += earlier
        progress.rewritten += 1
        each = _marked_each(properties.metadata, len(progress.each), earlier)
        if each is None:
            progress.unattributed += earlier
            return {}
        progress.add(each)
        return each

    async def _read(self, blob: BlobClient) -> tuple[bytes, str, BlobProperties] | None:
        """The blob's content, etag and properties; None when it no longer exists."""
        return await read_blob(blob)

    async def _tenant_problems(self, request: StepRequest) -> list[str] | None:
        """A problem when the first log blob under the prefix holds JSON records and none of
        the first SAMPLE_BYTES carries the tenant field: erasing would find none of the
        subject's records (a misnamed field); None when the blob could not be read. Reads a
        range of one blob; changes nothing."""
        locator = self.locator(request)
        field = locator.tenant_field
        if field is None:
            return []
        system = request.step.system
        container = self._service.get_container_client(locator.container)
        with self._errors(request, locator):
            async with asyncio.timeout(PREFLIGHT_TIMEOUT_SECONDS):
                first = None
                listing = container.list_blobs(
                    name_starts_with=locator.prefix or None, results_per_page=1
                )
                async for blob in listing:
                    first = blob
                    break
                if first is None or not first.size:
                    return []
                try:
                    download = await container.download_blob(
                        first.name, offset=0, length=min(SAMPLE_BYTES, first.size)
                    )
                    sample = await download.readall()
                except HttpResponseError as exc:
                    if exc.status_code in (401, 403, 404, 416):
                        return None  # refusals are the other checks' to report
                    raise
        lines = sample.split(b"\n")
        if len(sample) == SAMPLE_BYTES:
            lines = lines[:-1]  # the last line may be cut short
        records = [record for record in map(json_record, lines) if record is not None]
        if not records or any(isinstance(r.get(field), str) for r in records):
            return []
        return [
            f"logs system {system!r}: none of the first {len(records)} record(s) of the first "
            f"log blob under prefix {locator.prefix!r} in container {locator.container!r} has "
            f"the tenant_field {field!r}, so an erasure would find none of the subject's "
            "records (is the field named right?)"
        ]

    async def _blob_names(self, container: ContainerClient, locator: LogLocator) -> list[str]:
        return [blob.name async for blob in container.list_blobs(name_starts_with=locator.prefix)]
