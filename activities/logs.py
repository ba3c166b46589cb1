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
dropped or redacted in it (`lethe_request`, `lethe_step`, `lethe_records`; no personal data).
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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
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
    blob_errors,
    sas_problems,
)
from lethe.activities.common import verdict
from lethe.activities.driver_errors import service_code
from lethe.classification.datamap import LogLocator, MissingIdentity
from lethe.contracts import Evidence, StepOutcome, StepRequest, SweepBatch, SweepResult
from lethe.kernel.errors import LetheError

REDACTED = "[redacted]"
MARK_REQUEST, MARK_STEP, MARK_RECORDS = "lethe_request", "lethe_step", "lethe_records"
"""The metadata of a rewritten blob: the request and step that rewrote it, and how many of the
subject's records they dropped or redacted in it."""
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
    """One blob's content after dropping or redacting the subject's records."""

    content: bytes
    matched: int
    """Records of the subject that were dropped or redacted."""
    unparsed: int
    """Lines that are not a JSON object, kept unchanged."""
    redacted: int = 0
    """Records left alone whose mapped fields already say `[redacted]` (of the subject's tenant,
    where there is a tenant field)."""
    records: int = 0
    """Lines that are JSON objects. None in a non-empty blob: it could not be checked."""
    untenanted: int = 0
    """Records with the subject's values but no tenant in the tenant field: left alone, since
    whose they are cannot be told."""

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

    @classmethod
    def resumed(cls, journal: Journal) -> _Progress:
        """The progress an earlier attempt of this activity heartbeated, or a fresh start."""
        saved = journal.earlier_progress.get("progress")
        if not isinstance(saved, Mapping):
            return cls()
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {
            k: v
            for k, v in saved.items()
            if k in known and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        }
        last = saved.get("last_done")
        return cls(**values, last_done=last if isinstance(last, str) else None)


def subject_values(request: StepRequest, locator: LogLocator) -> dict[str, str]:
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


def rewrite(
    content: bytes,
    values: dict[str, str],
    fields: list[str],
    mode: Mode,
    *,
    tenant_field: str | None = None,
    tenant: str = "",
) -> Rewrite:
    """Drop (or redact `fields` of) the records where a field of `values` holds its value and,
    when `tenant_field` is given, that field holds `tenant`.

    Every other line, JSON or not, is kept byte for byte (another tenant's record with the same
    values too; one without a tenant is kept and counted as `untenanted`).
    """
    out: list[bytes] = []
    matched = unparsed = redacted = records = untenanted = 0
    for line in content.split(b"\n"):
        record = json_record(line)
        if record is None:
            unparsed += bool(line.strip())
            out.append(line)
            continue
        records += 1
        owner = record.get(tenant_field) if tenant_field is not None else tenant
        ours = owner == tenant
        if not any(field_text(record.get(name)) == value for name, value in values.items()):
            redacted += ours and any(record.get(name) == REDACTED for name in fields)
            out.append(line)
            continue
        if not ours:
            untenanted += not isinstance(owner, str)
            out.append(line)
            continue
        matched += 1
        if mode == "redact":
            for name in fields:
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
    )


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
    """How the step finds the subject's records: the values, the fields to redact, the tenant."""

    values: dict[str, str]
    fields: list[str]
    tenant_field: str | None
    tenant: str

    @classmethod
    def of(cls, request: StepRequest, locator: LogLocator) -> _Finder:
        return cls(
            subject_values(request, locator),
            list(locator.fields),
            locator.tenant_field,
            request.subject.tenant,
        )

    def rewrite(self, content: bytes, mode: Mode) -> Rewrite:
        return rewrite(
            content,
            self.values,
            self.fields,
            mode,
            tenant_field=self.tenant_field,
            tenant=self.tenant,
        )


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


def _step_marks(request: StepRequest) -> dict[str, str]:
    """The marks of a blob this request's step rewrote (with MARK_RECORDS, how many records)."""
    return {MARK_REQUEST: request.request_id, MARK_STEP: request.step.id}


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


class LogRedactor(BlobConnector[LogLocator]):
    """Drops (`delete`) or redacts (`redact`, `anonymize`) a subject's records in log blobs.

    Blobs are taken in name order; after each one the activity heartbeats the name of the last
    blob done and its counts, and a retried attempt resumes after it. Blobs without the
    subject's records are read but never rewritten; a rewritten one carries the step's marks.
    Only block blobs can be swapped whole: an append or page blob holding the subject's records
    is counted and makes the step `failed`.
    """

    kind = "logs"
    locator_model = LogLocator
    actions = ("delete", "redact", "purge", "anonymize")
    checks = (
        "a value to find records by; the container exists and listing under the prefix works; "
        "the signature allows read, list and write; with tenant_field, records carry it"
    )
    proves = "no record of the subject is left in any log blob under the prefix"
    retries = "each rewritten blob's lethe_request, lethe_step and lethe_records metadata"
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
            problem = await self._tenant_problem(request, locator)
            if problem is not None:
                problems.append(problem)
        return problems

    async def erase(self, request: StepRequest) -> StepOutcome:
        """Drop or redact the subject's records in every log blob under the prefix."""
        locator = self.locator(request)
        mode = _MODES[request.step.action]
        finder = _Finder.of(request, locator)
        journal = Journal.resume(request)
        progress = _Progress.resumed(journal)
        # What the earlier attempts' last heartbeat that arrived counts (blobs it finished).
        recorded = (progress.affected, progress.rewritten) if progress.last_done else None
        with self._errors(request, locator):
            container = self._service.get_container_client(locator.container)
            names = await self._blob_names(container, locator)
            resumed_from = _resume_at(names, progress.last_done)
            if resumed_from is None:  # that blob is gone: read every blob again, count afresh
                resumed_from, progress, recorded = 0, _Progress(), None
            for name in names[resumed_from:]:
                blob = container.get_blob_client(name)
                await self._erase_blob(blob, request, finder, mode, progress)
                progress.last_done = _digest(name)
                journal.progress["progress"] = asdict(progress)
                journal.beat()

        detail = ""
        if progress.not_rewritable:
            detail = (
                f"{progress.not_rewritable} append or page blob(s) hold the subject's records; "
                "only block blobs can be rewritten atomically, so they were left unchanged"
            )
        records = "records_dropped" if mode == "drop" else "records_redacted"
        evidence: Evidence = {
            "action": request.step.action,
            "blobs_scanned": progress.scanned,
            "blobs_rewritten": progress.rewritten,
            records: progress.affected,
            "unparsed_lines": progress.unparsed,
            "write_conflicts_retried": progress.conflicts,
            "blobs_not_rewritable": progress.not_rewritable,
            "blobs_without_json": progress.unreadable,
            "resumed_from_blob": resumed_from,
        }
        if locator.tenant_field is not None:
            evidence["records_without_tenant"] = progress.untenanted
        if journal.attempt > 1 or recorded is not None or progress.earlier_rewritten:
            # The blobs an earlier attempt finished are in its heartbeat; those it rewrote
            # after that heartbeat (or with none arriving) say so in their marks.
            records_then, blobs_then = recorded or (0, 0)
            earlier_records = records_then + progress.earlier_records
            evidence.update(
                {
                    "first_attempt_evidence": "blob metadata" if recorded is None else "recorded",
                    "earlier_attempts": journal.attempt - 1,
                    "earlier_blobs_rewritten": blobs_then + progress.earlier_rewritten,
                    f"earlier_{records}": earlier_records,
                    f"retry_{records}": progress.affected - earlier_records,
                }
            )
        return StepOutcome(
            step_id=request.step.id,
            status="failed" if progress.not_rewritable else "running",
            affected=progress.affected,
            evidence=evidence,
            detail=detail,
        )

    async def verify(self, request: StepRequest, erased: StepOutcome) -> StepOutcome:
        """Rescan every log blob: no record may still carry the subject's values (in their
        tenant), and none may carry them without a tenant where the locator names one."""
        locator = self.locator(request)
        finder = _Finder.of(request, locator)
        # Within the erase activity, verify's heartbeats keep erase's record for a retry.
        journal = Journal.current(request) or Journal(request.request_id, request.step.id)
        matching = unparsed = redacted = blobs = unreadable = untenanted = 0
        with self._errors(request, locator):
            container = self._service.get_container_client(locator.container)
            for index, name in enumerate(await self._blob_names(container, locator)):
                read = await read_blob(container.get_blob_client(name))
                if read is not None:
                    found = finder.rewrite(read[0], "drop")
                    matching += found.matched
                    unparsed += found.unparsed
                    redacted += found.redacted
                    unreadable += found.unreadable(read[0])
                    untenanted += found.untenanted
                    blobs += 1
                journal.alive(verified_blobs=index + 1)
        evidence: Evidence = {
            "blobs_scanned": blobs,
            "records_matching": matching,
            "unparsed_lines": unparsed,
            "records_redacted_present": redacted,
            "blobs_without_json": unreadable,
        }
        if locator.tenant_field is not None:
            evidence["records_without_tenant"] = untenanted
        problems: list[str] = []
        if matching:
            problems.append(f"{matching} log record(s) still carry the subject's values")
        if untenanted:
            problems.append(
                f"{untenanted} log record(s) carry the subject's values but no tenant in "
                f"{locator.tenant_field!r}, so whose they are cannot be told; they were left"
            )
        if unreadable:
            problems.append(
                f"{unreadable} blob(s) under the prefix hold no JSON lines (compressed, or "
                "another format), so they could not be checked"
            )
        if problems and erased.detail:
            problems.append(erased.detail)
        return verdict(erased, evidence, problems)

    async def sweep(self, batch: SweepBatch) -> SweepResult:
        """One batch of a retention sweep: the lines past their period dropped from a few log
        blobs, those under an obligation or a hold kept (`lethe.activities.logs_retention`)."""
        from lethe.activities.logs_retention import sweep_logs  # it imports this module

        return await sweep_logs(self._service, self._endpoint, batch)

    # --- one blob ------------------------------------------------------------------------------

    async def _erase_blob(
        self,
        blob: BlobClient,
        request: StepRequest,
        finder: _Finder,
        mode: Mode,
        progress: _Progress,
    ) -> None:
        """The effect on one blob: rewrite it without the subject's records, with the step's
        marks; a blob the step rewrote before (its marks say so) counts as rewritten."""
        earlier: int | None = None
        for attempt in range(ATTEMPTS):
            read = await self._read(blob)
            if read is None:  # deleted since it was listed: nothing of the subject's is left
                return
            content, etag, properties = read
            result = finder.rewrite(content, mode)
            if attempt == 0:
                progress.scanned += 1
                progress.unparsed += result.unparsed
                progress.unreadable += result.unreadable(content)
                progress.untenanted += result.untenanted
                earlier = marked_count(properties.metadata, _step_marks(request), MARK_RECORDS)
                if earlier is not None:  # rewritten by an earlier attempt of this step
                    progress.earlier_rewritten += 1
                    progress.earlier_records += earlier
                    progress.affected += earlier
                    progress.rewritten += 1
            if not result.matched:
                return
            if properties.blob_type != BlobType.BLOCKBLOB:
                progress.not_rewritable += 1
                return
            marks = {
                **_step_marks(request),
                MARK_RECORDS: str((earlier or 0) + result.matched),
            }
            try:
                await swap_blob(
                    blob, result.content, etag, properties, with_marks(properties.metadata, marks)
                )
            except ResourceModifiedError:
                progress.conflicts += 1
                continue
            progress.affected += result.matched
            progress.rewritten += earlier is None
            return
        raise LogBlobBusy(
            f"a log blob changed {ATTEMPTS} times while it was being rewritten; "
            "the step will run again"
        )

    async def _read(self, blob: BlobClient) -> tuple[bytes, str, BlobProperties] | None:
        """The blob's content, etag and properties; None when it no longer exists."""
        return await read_blob(blob)

    async def _tenant_problem(self, request: StepRequest, locator: LogLocator) -> str | None:
        """A problem when the first log blob under the prefix holds JSON records and none of
        the first SAMPLE_BYTES carries the tenant field: erasing would find none of the
        subject's records (a misnamed field). Reads a range of one blob; changes nothing."""
        field = locator.tenant_field
        if field is None:
            return None
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
                    return None
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
            return None
        return (
            f"logs system {system!r}: none of the first {len(records)} record(s) of the first "
            f"log blob under prefix {locator.prefix!r} in container {locator.container!r} has "
            f"the tenant_field {field!r}, so an erasure would find none of the subject's "
            "records (is the field named right?)"
        )

    @contextmanager
    def _errors(self, request: StepRequest, locator: LogLocator) -> Iterator[None]:
        with blob_errors(self._endpoint, request.step.system, locator.container):
            yield

    async def _blob_names(self, container: ContainerClient, locator: LogLocator) -> list[str]:
        return [blob.name async for blob in container.list_blobs(name_starts_with=locator.prefix)]
