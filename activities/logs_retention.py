"""Retention sweeps of JSON-lines log blobs: lines past their period dropped, a few blobs a call.

Each call reads one listing page of log blobs under the locator's prefix (at most
LOG_BLOBS_PER_CALL) and judges every line: a JSON record is due when its date field (dotted for
a nested one) plus the limit is before now and every obligation has ended. The rest is kept byte
for byte, in order, and the blob is swapped in only if nobody wrote to it since it was read
(If-Match on its ETag, as the erasure's log connector does); a concurrent writer makes the swap
fail, and the blob is read and judged again, so their lines are never lost. A blob whose lines
are all due is deleted, under the same condition.

Kept and counted: lines that are not JSON records and records without a usable date (`undated`;
with `nulls: delete` a record without the limit's date goes), and due records under a hold
(`held`): a hold on the whole task, a tenant hold (by the tenant scope's field, when the map gives
one), a subject hold (by the locator's subject-id field, under the record's tenant). A rewritten
blob carries the sweep's mark and how many lines it dropped there, so a retried call counts them
again rather than reporting them lost. A dry run reads only, and gives no samples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from azure.core import MatchConditions
from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError
from azure.storage.blob import BlobProperties, BlobType
from azure.storage.blob.aio import BlobClient, BlobServiceClient

from lethe.activities.blob import blob_errors
from lethe.activities.blob_retention import (
    PageCounts,
    hold_detail,
    judged,
    listed_page,
    page_result,
)
from lethe.activities.driver_errors import service_code
from lethe.activities.logs import (
    ATTEMPTS,
    LogBlobBusy,
    field_text,
    json_record,
    marked_count,
    read_blob,
    swap_blob,
    with_marks,
)
from lethe.activities.sweeps import sweep_holds, tenant_field
from lethe.classification.datamap import DateTrigger, LogLocator
from lethe.contracts import ScopeMatch, SweepBatch, SweepResult
from lethe.kernel.errors import ConfigurationError

LOG_BLOBS_PER_CALL = 16
"""The most log blobs one call reads and rewrites (fewer with a smaller batch size)."""
MARK_SWEEP, MARK_SWEEP_LINES = "lethe_sweep", "lethe_sweep_lines"
"""The metadata of a blob a sweep rewrote: which sweep and task (a digest), and how many lines
it dropped there."""
EPOCH_MILLISECONDS = 10**11
"""A number this large as a date is milliseconds since the epoch (as seconds: beyond year 5000)."""
Judgement = Literal["out", "kept", "undated", "held", "due"]


@dataclass
class _Blob:
    """One blob's lines, judged: what stays, and the counts."""

    content: bytes = b""
    removed: int = 0
    held: int = 0
    undated: int = 0
    unparsed: int = 0
    records: int = 0
    dated: list[datetime] = field(default_factory=list)
    rest: bool = False
    """Some line other than a blank one stays."""


@dataclass
class _Counts(PageCounts):
    unparsed: int = 0
    records: int = 0
    dated: int = 0
    earliest: datetime | None = None
    latest: datetime | None = None
    rewritten: int = 0
    deleted: int = 0
    not_rewritable: int = 0
    """Append or page blobs with due lines: left unchanged."""

    def add(self, blob: _Blob, removed: int) -> None:
        self.removed += removed
        self.held += blob.held
        self.undated += blob.undated
        self.unparsed += blob.unparsed
        self.records += blob.records
        self.dated += len(blob.dated)
        self.earliest, self.latest = _bounds([self.earliest, self.latest, *blob.dated])


class LogSweep:
    """One batch of a retention sweep over one log locator."""

    def __init__(self, service: BlobServiceClient, endpoint: str, batch: SweepBatch) -> None:
        """Sweep `batch` in the account `service` opens (at `endpoint`, for errors)."""
        if not isinstance(batch.task.locator, LogLocator):
            raise ConfigurationError(f"task {batch.task.id} is not over log blobs")
        self._service = service
        self._endpoint = endpoint
        self._batch = batch
        self._task = batch.task
        self._locator: LogLocator = batch.task.locator
        self._holds = sweep_holds(batch.task, batch.holds)
        self._tenant_scope = tenant_field(batch.task)
        subject_fields = [name for name, src in self._locator.fields.items() if src == "subject_id"]
        self._subject_field = subject_fields[0] if subject_fields else None
        digest = hashlib.sha256(f"{batch.run_id}\x00{batch.task.id}".encode())
        self._mark = digest.hexdigest()[:32]

    async def run(self) -> SweepResult:
        """Judge every line of one page of log blobs, rewrite (or count) those with due lines,
        and say where the next page starts."""
        task, batch, locator = self._task, self._batch, self._locator
        if task.limit is None:
            return SweepResult(task_id=task.id, done=True, detail="no storage limit: none due")
        counts = _Counts()
        with blob_errors(self._endpoint, task.system, locator.container):
            container = self._service.get_container_client(locator.container)
            blobs, marker = await listed_page(container, batch, locator.prefix, LOG_BLOBS_PER_CALL)
            for blob in blobs:
                await self._sweep_blob(container.get_blob_client(blob.name), counts)
        dated = [d for d in (counts.earliest, counts.latest) if d is not None]
        return page_result(task, counts, marker, dated, self._detail(counts))

    # --- one blob ------------------------------------------------------------------------------

    async def _sweep_blob(self, blob: BlobClient, counts: _Counts) -> None:
        """Drop the due lines of one blob (a dry run or a whole-task hold only counts them)."""
        for _ in range(ATTEMPTS):
            read = await self._read(blob)
            if read is None:  # deleted since it was listed (maybe by an earlier attempt)
                return
            content, etag, properties = read
            judged_blob = self._judge(content)
            earlier = 0 if self._batch.dry_run else self._swept(properties.metadata)
            if self._batch.dry_run or not judged_blob.removed:
                counts.add(judged_blob, judged_blob.removed + earlier)
                return
            if properties.blob_type != BlobType.BLOCKBLOB and judged_blob.rest:
                counts.not_rewritable += 1
                counts.add(judged_blob, earlier)
                return
            try:
                if judged_blob.rest:
                    metadata = self._marks(properties.metadata, earlier + judged_blob.removed)
                    await swap_blob(blob, judged_blob.content, etag, properties, metadata)
                    counts.rewritten += 1
                else:
                    await blob.delete_blob(
                        delete_snapshots="include",
                        etag=etag,
                        match_condition=MatchConditions.IfNotModified,
                    )
                    counts.deleted += 1
            except ResourceModifiedError:
                continue  # written meanwhile: read and judge it again, keeping their lines
            except ResourceNotFoundError as exc:
                if service_code(exc) == "ContainerNotFound":
                    raise
                return
            counts.add(judged_blob, judged_blob.removed + earlier)
            return
        raise LogBlobBusy(
            f"a log blob changed {ATTEMPTS} times while the retention sweep rewrote it; the "
            "batch will run again"
        )

    async def _read(self, blob: BlobClient) -> tuple[bytes, str, BlobProperties] | None:
        """The blob's content, etag and properties; None when it no longer exists."""
        return await read_blob(blob)

    def _judge(self, content: bytes) -> _Blob:
        """Each line of `content` judged; the kept ones joined as they were."""
        out: list[bytes] = []
        result = _Blob()
        limit = self._task.limit
        for line in content.split(b"\n"):
            if not line.strip():
                out.append(line)
                continue
            record = json_record(line)
            if record is None:
                result.unparsed += 1
                result.undated += 1
                result.rest = True
                out.append(line)
                continue
            result.records += 1
            judgement, dates = self._line(record)
            if limit is not None and judgement != "out":
                limit_date = dates.get(limit.trigger)
                if limit_date is not None:
                    result.dated.append(limit_date)
            if judgement == "due":
                result.removed += 1
                continue
            result.undated += judgement == "undated"
            result.held += judgement == "held"
            result.rest = True
            out.append(line)
        result.content = b"\n".join(out)
        return result

    def _line(
        self, record: Mapping[str, Any]
    ) -> tuple[Judgement, dict[DateTrigger, datetime | None]]:
        task = self._task
        if not all(_in_scope(match, record) for match in task.scope):
            return "out", {}
        dates = {trigger: _date(_value(record, name)) for trigger, name in task.dates.items()}
        verdict = judged(task, dates, self._batch.now)
        if verdict != "due":
            return verdict, dates
        return ("held" if self._held(record) else "due"), dates

    def _held(self, record: Mapping[str, Any]) -> bool:
        """A due record some hold keeps: on the whole task, on its tenant, on its subject. A
        record whose tenant or subject cannot be told is kept while such holds are active."""
        holds = self._holds
        if holds.whole:
            return True
        if holds.tenants and self._tenant_scope is not None:
            tenant = _value(record, self._tenant_scope)
            if not isinstance(tenant, str) or tenant in holds.tenants:
                return True
        if not holds.subjects:
            return False
        subject = field_text(record.get(self._subject_field)) if self._subject_field else None
        if subject is None:
            # No subject id to look up; any other value naming someone keeps it.
            return any(record.get(name) is not None for name in self._locator.fields)
        tenant_key = self._tenant_scope or self._locator.tenant_field
        tenant = _value(record, tenant_key) if tenant_key else None
        tenants = [tenant] if isinstance(tenant, str) else self._task.tenants
        # With no tenant to look the subject up under, whose it is cannot be told: kept.
        return not tenants or holds.keeps_subject(subject, tenants)

    def _marks(self, metadata: Mapping[str, str] | None, lines: int) -> dict[str, str]:
        """The blob's metadata with this sweep's marks, for `lines` dropped lines."""
        return with_marks(metadata, {MARK_SWEEP: self._mark, MARK_SWEEP_LINES: str(lines)})

    def _swept(self, metadata: Mapping[str, str] | None) -> int:
        """How many lines this sweep's task dropped in a blob before (an earlier attempt of this
        batch), by the blob's marks; 0 when it did not rewrite it."""
        return marked_count(metadata, {MARK_SWEEP: self._mark}, MARK_SWEEP_LINES) or 0

    def _detail(self, counts: _Counts) -> str:
        parts = []
        if self._holds.whole:
            parts.append(hold_detail(self._holds))
        if counts.rewritten or counts.deleted:
            parts.append(
                f"{counts.rewritten} log blob(s) rewritten, {counts.deleted} deleted whole"
            )
        if counts.not_rewritable:
            parts.append(
                f"{counts.not_rewritable} append or page blob(s) hold due lines among others: "
                "only block blobs can be rewritten atomically, so they were left unchanged"
            )
        if counts.unparsed:
            parts.append(f"{counts.unparsed} line(s) are not JSON records: kept")
        limit = self._task.limit
        if counts.records and not counts.dated and limit is not None:
            name = self._task.dates.get(limit.trigger, "?")
            parts.append(
                f"none of the {counts.records} record(s) read has a date in {name!r}: is the "
                "field named right?"
            )
        return "; ".join(parts)


def _value(record: Mapping[str, Any], name: str) -> Any:
    """The record's value at `name`: the key itself, else the dotted path into nested objects."""
    if name in record:
        return record[name]
    value: Any = record
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _date(value: object) -> datetime | None:
    """An ISO 8601 date (a naive one taken as UTC), or seconds or milliseconds since the epoch;
    None for anything else."""
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return None
        return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = value / 1000 if abs(value) >= EPOCH_MILLISECONDS else value
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    return None


def _in_scope(match: ScopeMatch, record: Mapping[str, Any]) -> bool:
    value = _value(record, match.field)
    if match.null:
        return value is None
    text = field_text(value)
    if text is None:
        return False
    return text in match.values if match.values else text not in match.others


def _bounds(moments: list[datetime | None]) -> tuple[datetime | None, datetime | None]:
    known = [m for m in moments if m is not None]
    return (min(known), max(known)) if known else (None, None)


async def sweep_logs(service: BlobServiceClient, endpoint: str, batch: SweepBatch) -> SweepResult:
    """One batch of a retention sweep over a log locator (see the module's docstring)."""
    return await LogSweep(service, endpoint, batch).run()
