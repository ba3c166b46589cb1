"""Retention sweeps of blob backups: blobs past their storage limit deleted, a listing page a call.

A `BlobBackupLocator` covers whole-database backups (under `whole_backup_prefix`) and per-subject
blobs (tagged `subject_tag` = the subject reference, or named by `subject_prefix`). Each is dated
by the storage service's own property (`creation_time` or `last_modified`, as the data map's
`retention` says) and is due once its limit and every obligation have ended. A due blob is
deleted with its snapshots only if it is still the blob that was listed (If-Match on its ETag).

Holds: a hold on the whole task keeps everything. A whole backup holds every subject of the
system, so any active subject hold keeps them all; a tagged blob is kept when its tag (a subject
reference) is held; a blob found by `subject_prefix` names its subject only in its name, so any
subject hold keeps those too. A dry run deletes nothing and shows only whole backups' names.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeVar, cast

from azure.core import MatchConditions
from azure.core.async_paging import AsyncItemPaged, AsyncPageIterator
from azure.core.exceptions import HttpResponseError, ResourceModifiedError, ResourceNotFoundError
from azure.storage.blob import BlobProperties
from azure.storage.blob.aio import BlobServiceClient, ContainerClient

from lethe.activities.blob import HOLD_CODES, aware, blob_errors, bounded
from lethe.activities.driver_errors import service_code
from lethe.activities.sweeps import SweepHolds, sweep_holds
from lethe.classification.datamap import BlobBackupLocator, DateTrigger
from lethe.contracts import SweepBatch, SweepResult, SweepTask
from lethe.kernel.errors import ConfigurationError

T = TypeVar("T")
Verdict = Literal["due", "kept", "undated"]
Covered = Literal["whole", "tagged", "prefixed"]

PAGE_LIMIT = 5000
"""The most blobs one listing page holds (the service's own limit)."""
DATE_PROPERTIES = ("creation_time", "last_modified")


def judged(task: SweepTask, dates: Mapping[DateTrigger, datetime | None], now: datetime) -> Verdict:
    """Whether a record dated `dates` (trigger -> date) is due under the task's limit and
    obligations at `now`: `undated` when a date it needs is missing (a missing limit date is
    only due with `nulls: delete`; a missing obligation date always keeps the record)."""
    limit, now = task.limit, aware(now)
    if limit is None:
        return "kept"
    obligations = [(term, dates.get(term.trigger)) for term in task.obligations]
    if any(date is None for _, date in obligations):
        return "undated"
    limit_date = dates.get(limit.trigger)
    if limit_date is None:
        if task.nulls != "delete":
            return "undated"
    elif aware(limit_date) + limit.period >= now:
        return "kept"
    for term, date in obligations:
        if date is not None and aware(date) + term.period >= now:
            return "kept"
    return "due"


async def one_page(listing: AsyncItemPaged[T], marker: str | None) -> tuple[list[T], str | None]:
    """The page of `listing` starting at `marker` (None: the first), and the next page's
    marker (None: it was the last)."""
    pages = cast(AsyncPageIterator[T], listing.by_page(continuation_token=marker))
    async for page in pages:
        return [item async for item in page], pages.continuation_token or None
    return [], None


def marker_of(batch: SweepBatch) -> str | None:
    """The listing marker a batch's cursor holds; None: from the start."""
    cursor = batch.cursor
    if not cursor:
        return None
    if len(cursor) != 1 or not isinstance(cursor[0], str):
        raise ConfigurationError(
            f"task {batch.task.id}: a blob sweep's cursor is one listing marker, not {len(cursor)} "
            "value(s)"
        )
    return cursor[0]


def date_range(dates: list[datetime]) -> tuple[str | None, str | None]:
    """The earliest and latest of `dates` (ISO 8601), for the ledger."""
    if not dates:
        return None, None
    return min(dates).isoformat(), max(dates).isoformat()


def hold_detail(holds: SweepHolds) -> str:
    """What the detail says when holds keep the whole task."""
    return "kept for legal hold(s) " + ", ".join(holds.whole) + " on the whole task"


async def listed_page(
    container: ContainerClient, batch: SweepBatch, prefix: str, most: int, *, tags: bool = False
) -> tuple[list[BlobProperties], str | None]:
    """The page of the container's blobs under `prefix` (at most `most`, fewer with a smaller
    batch size, with their `tags`) that the batch's cursor starts, and the next page's marker."""
    listing = container.list_blobs(
        name_starts_with=prefix or None,
        include=["tags"] if tags else None,
        results_per_page=min(batch.batch_size, most),
    )
    return await one_page(listing, marker_of(batch))


@dataclass
class PageCounts:
    """What a batch over one listing page counts for its result."""

    removed: int = 0
    held: int = 0
    undated: int = 0
    samples: list[str] = field(default_factory=list)


def page_result(
    task: SweepTask, counts: PageCounts, marker: str | None, dated: list[datetime], detail: str
) -> SweepResult:
    """A batch's result over one listing page: its counts, the range of the `dated` records,
    and the next page's `marker` as the cursor (none: done)."""
    first, last = date_range(dated)
    return SweepResult(
        task_id=task.id,
        removed=counts.removed,
        held=counts.held,
        undated=counts.undated,
        cursor=[marker] if marker else None,
        done=marker is None,
        first=first,
        last=last,
        samples=counts.samples,
        detail=detail,
    )


@dataclass
class _Counts(PageCounts):
    whole_held: int = 0
    """Due whole backups kept because some subject hold is active."""
    prefixed_held: int = 0
    """Due blobs found by subject_prefix kept because some subject hold is active."""
    refused: dict[str, int] = field(default_factory=dict)
    """Why the service refused to delete (a HOLD_CODES reason) -> how many blobs."""
    changed: int = 0
    """Due blobs replaced since they were listed: not deleted."""


@dataclass(frozen=True)
class _Due:
    name: str
    etag: str


class BackupSweep:
    """One batch of a retention sweep over one backup locator."""

    def __init__(self, service: BlobServiceClient, endpoint: str, batch: SweepBatch) -> None:
        """Sweep `batch` in the account `service` opens (at `endpoint`, for errors)."""
        self._service = service
        self._endpoint = endpoint
        self._batch = batch
        self._task = batch.task
        if not isinstance(batch.task.locator, BlobBackupLocator):
            raise ConfigurationError(f"task {batch.task.id} is not over blob backups")
        self._locator: BlobBackupLocator = batch.task.locator
        self._holds = sweep_holds(batch.task, batch.holds)
        self._prefixed = _prefix_pattern(self._locator.subject_prefix)

    async def run(self) -> SweepResult:
        """List one page of the locator's blobs, delete (or count) the due ones, and say where
        the next page starts."""
        task, batch = self._task, self._batch
        self._check()
        if task.limit is None:
            return SweepResult(task_id=task.id, done=True, detail="no storage limit: none due")
        counts = _Counts()
        dated: list[datetime] = []
        due: list[_Due] = []
        locator = self._locator
        with blob_errors(self._endpoint, task.system, locator.container):
            container = self._service.get_container_client(locator.container)
            blobs, marker = await listed_page(
                container, batch, self._listing_prefix(), PAGE_LIMIT, tags=bool(locator.subject_tag)
            )
            for blob in blobs:
                covered = self._covered(blob)
                if covered is None:
                    continue
                dates = {trigger: _date(blob, name) for trigger, name in task.dates.items()}
                limit_date = dates.get(task.limit.trigger)
                if limit_date is not None:
                    dated.append(limit_date)
                verdict = judged(task, dates, batch.now)
                if verdict == "undated":
                    counts.undated += 1
                elif verdict == "due" and not self._held(blob, covered, counts):
                    due.append(_Due(blob.name, blob.etag))
                    if batch.dry_run and covered == "whole" and len(counts.samples) < batch.samples:
                        counts.samples.append(blob.name)  # holds no subject id: whole backups
            if batch.dry_run:
                counts.removed = len(due)
            else:
                await self._delete(container, due, counts)
        return page_result(task, counts, marker, dated, self._detail(counts))

    def _check(self) -> None:
        """Refuse what a backup sweep cannot judge: a date that is not a blob property, a
        scope (a blob has no fields)."""
        task = self._task
        where = f"blob system {task.system!r}, container {self._locator.container!r}"
        for trigger, name in task.dates.items():
            if name not in DATE_PROPERTIES:
                raise ConfigurationError(
                    f"{where}: {trigger} is dated by {name[:60]!r}, which is not a property of "
                    f"a blob; give {' or '.join(DATE_PROPERTIES)}"
                )
        if task.scope:
            raise ConfigurationError(
                f"{where}: a backup blob has no fields to scope a rule by (task {task.id})"
            )

    def _listing_prefix(self) -> str:
        """Where every blob the locator covers lies: tagged blobs may be anywhere."""
        locator = self._locator
        if locator.subject_tag:
            return ""
        prefixes = [locator.whole_backup_prefix] if locator.whole_backup_prefix else []
        if locator.subject_prefix:
            prefixes.append(locator.subject_prefix.split("{", 1)[0])
        # Blob names, not paths: the common prefix character by character.
        return os.path.commonprefix(prefixes) if prefixes else ""  # noqa: RUF071

    def _covered(self, blob: BlobProperties) -> Covered | None:
        locator = self._locator
        if locator.whole_backup_prefix and blob.name.startswith(locator.whole_backup_prefix):
            return "whole"
        if locator.subject_tag and (blob.tags or {}).get(locator.subject_tag):
            return "tagged"
        if self._prefixed is not None and self._prefixed.match(blob.name):
            return "prefixed"
        return None

    def _held(self, blob: BlobProperties, covered: Covered, counts: _Counts) -> bool:
        """Whether a hold keeps this due blob (counted in `held`)."""
        holds = self._holds
        if holds.whole:
            held = True
        elif covered == "tagged":
            held = (blob.tags or {}).get(self._locator.subject_tag or "") in holds.subjects
        else:
            held = bool(holds.subjects)
            counts.whole_held += held and covered == "whole"
            counts.prefixed_held += held and covered == "prefixed"
        counts.held += held
        return held

    async def _delete(self, container: ContainerClient, due: list[_Due], counts: _Counts) -> None:
        """Delete each due blob with its snapshots, unless it changed since it was listed."""

        async def delete(blob: _Due) -> None:
            try:
                await container.delete_blob(
                    blob.name,
                    delete_snapshots="include",
                    etag=blob.etag,
                    match_condition=MatchConditions.IfNotModified,
                )
                counts.removed += 1
            except ResourceModifiedError:
                counts.changed += 1
            except ResourceNotFoundError as exc:
                if service_code(exc) == "ContainerNotFound":
                    raise
                # Gone already: an earlier attempt of this batch deleted it, and counted it.
            except HttpResponseError as exc:
                reason = HOLD_CODES.get(service_code(exc))
                if reason is None:
                    raise
                counts.refused[reason] = counts.refused.get(reason, 0) + 1
                counts.held += 1

        await bounded([delete(blob) for blob in due])

    def _detail(self, counts: _Counts) -> str:
        parts = []
        if self._holds.whole:
            parts.append(hold_detail(self._holds))
        if counts.whole_held:
            parts.append(
                f"{counts.whole_held} due whole backup(s) kept: they hold every subject of the "
                "system, and subject hold(s) are active"
            )
        if counts.prefixed_held:
            parts.append(
                f"{counts.prefixed_held} due blob(s) found by subject_prefix kept: whose they "
                "are is in their names only, and subject hold(s) are active"
            )
        parts += [
            f"the service refused to delete {n} blob(s) under {reason}"
            for reason, n in sorted(counts.refused.items())
        ]
        if counts.changed:
            parts.append(
                f"{counts.changed} due blob(s) changed since they were listed and were not "
                "deleted: the next sweep judges them again"
            )
        return "; ".join(parts)


def _date(blob: BlobProperties, name: str) -> datetime | None:
    value: Any = getattr(blob, name, None)
    return aware(value) if isinstance(value, datetime) else None


def _prefix_pattern(template: str | None) -> re.Pattern[str] | None:
    """What names `subject_prefix` renders to for any subject: each placeholder one or more
    characters other than `/` (a value holding `/` is not matched, so not swept)."""
    if template is None:
        return None
    parts = re.split(r"\{[^{}]*\}", template)
    return re.compile("[^/]+".join(re.escape(part) for part in parts))


async def sweep_backups(
    service: BlobServiceClient, endpoint: str, batch: SweepBatch
) -> SweepResult:
    """One batch of a retention sweep over a backup locator (see the module's docstring)."""
    return await BackupSweep(service, endpoint, batch).run()
