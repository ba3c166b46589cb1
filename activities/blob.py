"""The backup connector: deletes a subject's per-subject backups and expires whole-database ones.

Backups live in Azure Blob Storage. Per-subject blobs (exports, archives) are found by an index
tag holding the subject *reference* (never the raw id) or by a prefix rendered from the
subject's values, and deleted with their snapshots. Whole-database backups cannot be edited, so
they are deleted once they fall out of the erasure window, and only for a subject the erasure
found somewhere (see `BackupEraser`). What the
service cannot show (soft delete, versions, holds: Azurite answers 501 for most of them) is
reported as not checked, never as done.

The module also holds what the log connector (`lethe.activities.logs`) shares: the base over
one storage account and the translation of the SDK's errors into Lethe's.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Self, TypeVar
from urllib.parse import parse_qs

from azure.core.async_paging import AsyncItemPaged
from azure.core.exceptions import (
    HttpResponseError,
    ResourceNotFoundError,
)
from azure.storage.blob.aio import BlobServiceClient, ContainerClient

from lethe.activities.attempts import Journal
from lethe.activities.blob_checks import ContainerChecks
from lethe.activities.clients import Clients
from lethe.activities.common import SchemaMismatch, verdict
from lethe.activities.connector import Connector
from lethe.activities.driver_errors import lethe_error, service_code
from lethe.classification.datamap import BlobBackupLocator, LogLocator, MissingIdentity, render
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
from lethe.kernel.errors import ConfigurationError, LetheError

T = TypeVar("T")
L = TypeVar("L", bound=BlobBackupLocator | LogLocator)

CONCURRENCY = 16
"""Deletions (and a batch's per-subject look-ups) in flight at once."""
RANGE_PAGE = 5000
"""Blobs one page of a batch's range query over the tag returns (the service's most)."""
RANGE_PAGES_PER_SUBJECTS = 4
"""A batch's one range query may read one page per this many subjects at most: past that, one
query a subject (CONCURRENCY at once) costs fewer calls, and the batch falls back to them (a
batch of fewer subjects goes straight to them)."""
PREFLIGHT_TIMEOUT_SECONDS = 10
"""How long a preflight waits for the blob service, all its calls together."""
NOT_FOUND_NOTE = "not touched: the subject was found in no system and is not on the forget-list"
"""Why whole backups (which hold everyone) are left alone by an erasure that found no one."""
WHOLE_BACKUPS_DATED = "dated: those taken before the erasure go once past the window"
HOLD_CODES = {
    "BlobImmutableDueToLegalHold": "a legal hold",
    "BlobImmutableDueToPolicy": "an immutability policy",
    "ContainerHasLegalHold": "a legal hold on the container",
    "ContainerImmutabilityPolicyLocked": "the container's locked immutability policy",
    "LeaseIdMissing": "a lease another client holds",
}
"""Error codes that mean the service refuses to delete because the blob must be kept."""
_TAG_VALUE = re.compile(r"[A-Za-z0-9 +\-./:=_]{1,256}")

# --- shared with lethe.activities.logs ----------------------------------------------------------


class BlobServiceError(LetheError):
    """The blob service refused a request for a reason that retrying will not change."""


def blob_endpoint(connection_string: str) -> str:
    """Where a connection string points (endpoint or account), without its key."""
    fields = dict(part.split("=", 1) for part in connection_string.split(";") if "=" in part)
    return fields.get("BlobEndpoint", f"account {fields.get('AccountName', '?')}")


def is_unsupported(exc: HttpResponseError) -> bool:
    """The service does not implement the call (HTTP 501, Azurite's `APINotImplemented`)."""
    return exc.status_code == 501 or service_code(exc) in {"APINotImplemented", "NotImplemented"}


@contextmanager
def blob_errors(endpoint: str, system: str, container: str) -> Iterator[None]:
    """The SDK's errors as Lethe's (`driver_errors`, keeping their text out); a missing
    container is a SchemaMismatch naming it."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, ResourceNotFoundError) and service_code(exc) == "ContainerNotFound":
            raise SchemaMismatch(
                f"blob system {system!r}: container {container!r} does not exist"
            ) from None
        what = f"blob service at {endpoint} (container {container!r})"
        error = None if isinstance(exc, LetheError) else lethe_error(exc, what, BlobServiceError)
        if error is None:
            raise
        raise error from None


def sas_problems(
    connection_string: str, system: str, needs: dict[str, str], kind: str = "blob"
) -> list[str]:
    """What the connection's shared access signature says it cannot do: each permission of
    `needs` (letter -> what the step does with it) it lacks, resource types, its validity.
    Nothing for an account key, whose rights no request shows short of using them. Problems
    name the `kind` system."""
    fields = dict(part.split("=", 1) for part in connection_string.split(";") if "=" in part)
    signature = fields.get("SharedAccessSignature")
    if not signature:
        return []
    query = {k: v[0] for k, v in parse_qs(signature.lstrip("?"), keep_blank_values=True).items()}
    where = f"{kind} system {system!r}: the connection's shared access signature"
    problems = []
    granted = query.get("sp", "")
    missing = [f"{what} ({letter})" for letter, what in needs.items() if letter not in granted]
    if missing:
        problems.append(f"{where} does not allow " + ", ".join(missing))
    if "srt" in query and not {"c", "o"} <= set(query["srt"]):
        problems.append(f"{where} does not cover containers and blobs (srt needs c and o)")
    if "ss" in query and "b" not in query["ss"]:
        problems.append(f"{where} does not cover the blob service (ss needs b)")
    if query.get("sr") in ("b", "bs", "bv"):
        problems.append(f"{where} is for one blob, not the container")
    now = datetime.now(UTC)
    expires, starts = _sas_time(query.get("se")), _sas_time(query.get("st"))
    if expires is not None and expires <= now:
        problems.append(f"{where} expired at {expires.isoformat()}")
    if starts is not None and starts > now:
        problems.append(f"{where} is not valid before {starts.isoformat()}")
    return problems


def _sas_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return aware(datetime.fromisoformat(value))
    except ValueError:
        return None


def _refusal(exc: HttpResponseError, named: str, doing: str) -> str | None:
    """A refusal of the credentials or their rights as a problem of the system `named`; None
    for other errors."""
    status, code = exc.status_code or 0, service_code(exc)
    if status not in (401, 403):
        return None
    if code in ("AuthenticationFailed", "InvalidAuthenticationInfo", "NoAuthenticationInformation"):
        return f"{named}: the service refused the credentials (HTTP {status} {code})"
    return f"{named}: {doing} was refused (HTTP {status} {code})"


def aware(moment: datetime) -> datetime:
    """`moment` with a time zone; a naive time is taken as UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def batch_of_one(request: StepRequest) -> BatchStepRequest:
    """`request` as a batch of its one subject: the single path runs the batch code. Whole
    backups count the subject as found only when the request says so."""
    return BatchStepRequest(
        request_id=request.request_id,
        batch=0,
        step=request.step,
        subjects=[BulkSubject(subject_ref=request.subject_ref, subject=request.subject)],
        erasure_started_at=request.erasure_started_at,
        window_ends_at=request.window_ends_at,
        found=None if request.subject_found else [],
    )


def subject_found(batch: BatchStepRequest, item: BulkSubject) -> bool:
    """The erasure found the subject somewhere (or they are on the forget-list)."""
    return batch.found is None or item.subject_ref in batch.found


def counts_of(value: object, size: int) -> list[int]:
    """A heartbeated list of per-subject counts, `size` long (zeros where it says nothing)."""
    counts = [0] * size
    if isinstance(value, list) and len(value) == size:
        for i, n in enumerate(value):
            if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
                counts[i] = n
    return counts


# --- the backup connector ----------------------------------------------------------------------


@dataclass
class _Deletions:
    deleted: int = 0
    already_gone: int = 0
    held: dict[str, int] = field(default_factory=dict)
    """Why the service refused (a HOLD_CODES reason) -> how many blobs."""
    names: list[str] = field(default_factory=list)
    """Deleted now or already gone."""
    fresh: list[str] = field(default_factory=list)
    """Deleted by this call."""
    refused: dict[str, str] = field(default_factory=dict)
    """Blob name -> why the service refused to delete it."""


@dataclass
class _Found:
    """A batch's own blobs, each with the index in the batch of the subject whose it is."""

    owner: dict[str, int] = field(default_factory=dict)
    calls: int = 0
    """Calls (pages included) it took to find them."""
    lookup: str = "none"
    """How the tag was looked up: `range` (one query for the batch) or `per subject`."""
    unfindable: dict[int, str] = field(default_factory=dict)
    """Subject index -> why their prefix could not be made (no personal data)."""

    def add(self, names: Iterable[str], index: int) -> None:
        for name in names:
            self.owner.setdefault(name, index)

    def each(self, size: int, names: Iterable[str] | None = None) -> list[int]:
        """How many of `names` (of every blob found when None) are each subject's."""
        counts = [0] * size
        for name in self.owner if names is None else names:
            if name in self.owner:
                counts[self.owner[name]] += 1
        return counts


@dataclass(frozen=True)
class _Backup:
    name: str
    created: datetime


@dataclass(frozen=True)
class _WholeBackups:
    past: list[_Backup]
    """Taken before the erasure, and past the window: must be gone now."""
    inside: list[_Backup]
    """Taken before the erasure, still inside the window: due at creation + window length."""
    after: int
    """Taken after the erasure began: they do not hold the subject."""
    window: timedelta
    note: str | None = None
    """What was done with them, in words: None when the locator names none."""

    @property
    def touched(self) -> bool:
        """Listed and dated: not so when the erasure found the subject nowhere."""
        return self.note != NOT_FOUND_NOTE

    def due(self, backup: _Backup) -> datetime:
        return backup.created + self.window

    def count(self, value: int) -> int | None:
        """`value` as evidence: None (not counted) when the backups were not touched."""
        return value if self.touched else None


@dataclass(frozen=True)
class _SoftDelete:
    days: int | None
    """Days deleted blobs stay recoverable; None when off or unknown."""
    note: str


@dataclass(frozen=True)
class _Erased:
    """What an erase did for a batch (its journal tells what earlier attempts did)."""

    found: _Found
    subject: _Deletions
    expired: _Deletions
    whole: _WholeBackups
    soft_delete: _SoftDelete
    versions_note: str
    each: list[int]
    """Each subject's blobs deleted, by this attempt and the earlier ones as far as known."""
    now: datetime


@dataclass(frozen=True)
class _Checked:
    """What a check found for a batch: the subjects' blobs left, the whole backups."""

    found: _Found
    whole: _WholeBackups
    now: datetime


class BlobConnector(Connector[L]):
    """A connector over one storage account: its connection string and the worker's client."""

    def __init__(
        self,
        service: BlobServiceClient,
        connection_string: str,
        checks: ContainerChecks | None = None,
    ) -> None:
        """Use `service`, the client of the account `connection_string` opens, and keep the
        preflight's checks that pass in `checks` (the worker's, shared; else this
        connector's own)."""
        self._service = service
        self._connection = connection_string
        self._endpoint = blob_endpoint(connection_string)
        self._checks = checks if checks is not None else ContainerChecks()

    @classmethod
    def open(cls, clients: Clients, connection: str) -> Self:
        """The connector for an Azure Storage connection string, over the worker's client
        and its kept checks."""
        return cls(clients.blob_service(connection), connection, clients.blob_checks(connection))

    @contextmanager
    def _errors(self, request: StepRequest | BatchStepRequest, locator: L) -> Iterator[None]:
        """The SDK's errors as Lethe's (`blob_errors`); a container found gone drops its kept
        checks, so the next preflight asks the service."""
        try:
            with blob_errors(self._endpoint, request.step.system, locator.container):
                yield
        except SchemaMismatch:
            self._checks.forget(locator.container)
            raise

    async def container_problems(
        self,
        system: str,
        container_name: str,
        prefixes: list[str],
        tag_query: str | None = None,
        kind: str = "blob",
        *,
        templates: list[str] | None = None,
    ) -> list[str]:
        """Touching nothing: the container exists, the credentials open it, and listing blobs under
        each prefix (and finding them by `tag_query`) works; one blob a listing at most. Raises
        ServiceUnavailable within PREFLIGHT_TIMEOUT_SECONDS when the service does not answer.
        Problems name the `kind` system.

        A check that passed is kept for the worker (`blob_checks`) under the prefixes as the
        locator writes them (`templates`, when some are rendered from the subject's values;
        else `prefixes`) and whether a tag is looked up, never the subject's values: what the
        credentials may list in a container does not hang on whose blobs are listed."""
        key = (
            kind,
            container_name,
            system,
            tuple(dict.fromkeys(prefixes if templates is None else templates)),
            tag_query is not None,
        )
        return await self._checks.problems(
            key,
            lambda: self._container_problems(system, container_name, prefixes, tag_query, kind),
        )

    async def _container_problems(
        self,
        system: str,
        container_name: str,
        prefixes: list[str],
        tag_query: str | None,
        kind: str,
    ) -> list[str]:
        """`container_problems` asked of the service."""
        endpoint = self._endpoint
        container = self._service.get_container_client(container_name)
        in_container = f"container {container_name!r}"
        named = f"{kind} system {system!r}"
        with blob_errors(endpoint, system, container_name):
            async with asyncio.timeout(PREFLIGHT_TIMEOUT_SECONDS):
                try:
                    await container.get_container_properties()
                except ResourceNotFoundError as exc:
                    if service_code(exc) != "ContainerNotFound":
                        raise
                    return [f"{named}: {in_container} does not exist"]
                except HttpResponseError as exc:
                    refused = _refusal(exc, named, f"reading the properties of {in_container}")
                    if refused is None:
                        raise
                    return [refused]
                listings: list[tuple[str, AsyncItemPaged[Any]]] = [
                    (
                        f"listing blobs in {in_container}",
                        container.list_blobs(name_starts_with=prefix or None, results_per_page=1),
                    )
                    for prefix in dict.fromkeys(prefixes)
                ]
                if tag_query is not None:
                    listings.append(
                        (
                            f"finding blobs by index tag in {in_container}",
                            container.find_blobs_by_tags(tag_query, results_per_page=1),
                        )
                    )
                problems: list[str] = []
                for doing, listing in listings:
                    try:
                        async for _ in listing:
                            break  # one page of one blob: enough to know the call is allowed
                    except HttpResponseError as exc:
                        refused = _refusal(exc, named, doing)
                        if refused is None:
                            raise
                        if refused not in problems:
                            problems.append(refused)
                return problems


class BackupEraser(BlobConnector[BlobBackupLocator]):
    """Deletes a subject's backups in one blob container, within the erasure window.

    Per-subject blobs (found by `subject_tag` = the subject reference, or under the rendered
    `subject_prefix`) are deleted at once, snapshots included; a blob already gone counts as
    done. Whole-database backups under `whole_backup_prefix` hold everyone, so they are dated:
    a backup created before the erasure began holds the subject and must be gone by the end of
    the window, i.e. at the latest `window` after its creation (`window` = window_ends_at -
    erasure_started_at). Erase deletes those created at or before now - window and leaves the
    rest; backups created after the erasure began are left alone (the forget-list guards
    restores). Only when the erasure found the subject (`subject_found`: some step found their
    data, or they are on the forget-list): otherwise whole backups are not even listed, so an
    erasure of someone who exists nowhere (an id of `*`) destroys no one else's backups, and
    the evidence says why (`whole_backups`).

    A batch of subjects (`erase_batch`, bulk erasure) takes the same code as one subject (a
    batch of one): its tagged blobs are found by one range query from the batch's least
    reference to its greatest, keeping the blobs whose tag is one of the batch's (the tag
    filter has no OR); when that would read more than a page per RANGE_PAGES_PER_SUBJECTS
    subjects, by one query a subject, CONCURRENCY at once, as prefixes always are. Whole
    backups are judged once for the batch, and touched only when the erasure found one of its
    subjects. One journal tells the batch's plan and result; per-subject counts ride in it.

    Preflight touches nothing: it checks the container, the credentials and what they allow
    (listing; a shared access signature's permissions and expiry), and that the locator's
    prefix and tag can be made from the request. What it asks the service, once it passed, is
    kept for the worker for a short time (`blob_checks`); a problem is asked afresh each time.

    Verify returns `done` when nothing that must be gone by now remains. Pre-erasure backups
    still inside the window are not a failure: verify reports their count as
    `remaining_inside_window` in the evidence and sets `gone_by` to when the last one is due,
    and the workflow's deferred phase runs erase and verify again at that time. A blob the
    service refuses to delete (legal hold, immutability policy) makes the step `failed`.

    Erase tells how many blobs it found to delete in a heartbeat, and waits until the server
    holds it, before deleting any (`lethe.activities.attempts`): a retry after a lost worker finds
    nothing left to delete and reports what the earlier attempt had found, or that its counts
    were lost, never a count it did not see.

    Soft delete keeps deleted blobs recoverable for N days: erase reads the account's delete
    retention policy and, when it is on, says so and moves `gone_by` N days later. Earlier
    versions of deleted blobs are looked for and deleted where the service lists them. Holds
    are never assumed absent: the service's refusal to delete is what reveals them. What the
    service cannot answer (HTTP 501, as Azurite answers for versioning, immutability and legal
    holds) is named as not checked in the evidence and the detail, never reported as done.
    """

    kind = "blob"
    locator_model = BlobBackupLocator
    actions = ("delete",)
    batching = (
        "the batch's tagged blobs found by one range query over the tag (or one query a subject"
        " when that reads less); whole backups judged once"
    )
    checks = (
        "the container exists and the credentials open it; listing and finding by tag work; "
        "the shared access signature's permissions and expiry; the prefix and tag render"
    )
    proves = (
        "no blob of the subject remains and no whole backup taken before the erasure is past "
        "the window; what the service cannot show (versions, holds) is named as not checked"
    )
    retries = "the blobs found, heartbeated and confirmed before any is deleted"
    sweeps = (
        "blobs past the period by their own date deleted (If-Match); whole backups kept while "
        "a subject or tenant hold bears on the system"
    )

    async def preflight(self, request: StepRequest) -> list[str]:
        """Touching nothing: the subject's prefix renders and its reference can be a tag
        value, what the connection's signature allows, the container exists and the
        credentials open it, and listing (and finding by tag) there works."""
        locator = self.locator(request)
        system = request.step.system
        problems: list[str] = []
        prefixes: list[str] = []
        templates: list[str] = []
        tag_query: str | None = None
        if locator.subject_tag:
            if _TAG_VALUE.fullmatch(request.subject_ref):
                tag_query = _tag_query(locator.subject_tag, request.subject_ref)
            else:
                problems.append(
                    f"blob system {system!r}: the subject reference is not a valid blob index "
                    "tag value, so subject_tag cannot find the subject's blobs"
                )
        if locator.subject_prefix:
            try:
                _check_prefix_ends_after_placeholder(request, locator.subject_prefix)
                prefixes.append(
                    render(
                        locator.subject_prefix,
                        request.subject.template_values(request.subject_ref),
                    )
                )
                templates.append(locator.subject_prefix)
            except (ConfigurationError, MissingIdentity) as exc:
                problems.append(f"blob system {system!r}: subject_prefix: {exc}")
        if locator.whole_backup_prefix is not None:
            prefixes.append(locator.whole_backup_prefix)
            templates.append(locator.whole_backup_prefix)
        needs = {"r": "read", "l": "list", "d": "delete"}
        if locator.subject_tag:
            needs["f"] = "find by tags"
        problems += sas_problems(self._connection, system, needs)
        problems += await self.container_problems(
            system, locator.container, prefixes, tag_query, templates=templates
        )
        return problems

    async def erase(self, request: StepRequest) -> StepOutcome:
        """Delete the subject's blobs and the whole backups past the window: the batch code
        with a batch of one, under the request's own journal."""
        journal = Journal.resume(request)
        done = await self._erase(batch_of_one(request), journal)
        evidence: Evidence = {"action": request.step.action, **self._erase_evidence(done, journal)}
        affected = journal.affected("subject_blobs_deleted", "whole_backups_deleted")
        held = _merge(done.subject.held, done.expired.held)
        if held:
            return StepOutcome(
                step_id=request.step.id,
                status="failed",
                affected=affected,
                evidence=evidence,
                detail=_held_detail(held),
                gone_by=_gone_by(done, journal),
            )
        return StepOutcome(
            step_id=request.step.id,
            status="running",
            affected=affected,
            evidence=evidence,
            detail=_erased_detail(done, journal),
            gone_by=_gone_by(done, journal),
        )

    async def verify(self, request: StepRequest, erased: StepOutcome) -> StepOutcome:
        """Check no subject blob and no pre-erasure backup past the window remains."""
        checked = await self._check(batch_of_one(request))
        whole = checked.whole
        remaining = len(checked.found.owner)
        last_due = max((whole.due(b) for b in whole.inside), default=None)
        earlier = erased.gone_by if erased.gone_by and aware(erased.gone_by) > checked.now else None
        evidence: Evidence = {
            "subject_blobs_remaining": remaining,
            **_whole_evidence(whole),
            "soft_delete": erased.evidence.get("soft_delete"),
            "versions": erased.evidence.get("versions"),
        }
        problems = _remaining_problems(remaining)
        if whole.past:
            problems.append(_past_problem(whole))
        if problems and erased.status == "failed" and erased.detail:
            problems.append(erased.detail)
        days = erased.evidence.get("soft_delete_days")
        soft = _SoftDelete(
            days if isinstance(days, int) else None, str(erased.evidence.get("soft_delete") or "")
        )
        return verdict(
            erased,
            evidence,
            problems,
            _window_detail(len(whole.inside), last_due, soft, whole, checking=True),
            gone_by=_latest(last_due, earlier),
        )

    async def erase_batch(self, batch: BatchStepRequest) -> BatchStepOutcome:
        """Delete a batch's blobs (by one range query over the tag where it costs fewer calls
        than a query a subject) and, judged once for the batch, the whole backups past the
        window when the erasure found one of its subjects; then verify. One journal a batch."""
        journal = Journal.resume(batch)
        done = await self._erase(batch, journal)
        checked = await self._check(batch)
        size = len(batch.subjects)
        remaining = checked.found.each(size)
        whole_problem = _whole_problem(done.expired.held, checked.whole)
        outcomes = []
        for index, item in enumerate(batch.subjects):
            held = _merge(
                *(
                    {reason: 1}
                    for name, reason in done.subject.refused.items()
                    if done.found.owner.get(name) == index
                )
            )
            problems = [why for why in (done.found.unfindable.get(index),) if why]
            problems += [_held_detail(held)] if held else _remaining_problems(remaining[index])
            if whole_problem and subject_found(batch, item):
                problems.append(whole_problem)
            outcomes.append(_subject_outcome(item, problems, done.each[index]))
        evidence: Evidence = {
            "action": batch.step.action,
            **_batch_evidence(batch, done.found),
            **self._erase_evidence(done, journal),
            "subject_blobs_remaining": len(checked.found.owner),
            **_whole_evidence(checked.whole),
        }
        detail = _erased_detail(done, journal)
        return BatchStepOutcome(
            step_id=batch.step.id,
            outcomes=outcomes,
            evidence=evidence,
            detail=detail,
            gone_by=_gone_by(done, journal),
        )

    async def verify_batch(
        self, batch: BatchStepRequest, erased: BatchStepOutcome
    ) -> BatchStepOutcome:
        """Check again that no blob of the batch's subjects remains and, for the subjects the
        erasure found, that no pre-erasure backup past the window does."""
        checked = await self._check(batch)
        whole = checked.whole
        remaining = checked.found.each(len(batch.subjects))
        before = {outcome.subject_ref: outcome for outcome in erased.outcomes}
        outcomes = []
        for index, item in enumerate(batch.subjects):
            problems = [why for why in (checked.found.unfindable.get(index),) if why]
            problems += _remaining_problems(remaining[index])
            if whole.past and subject_found(batch, item):
                problems.append(_past_problem(whole))
            was = before.get(item.subject_ref)
            if problems and was is not None and was.status == "failed" and was.detail:
                problems.append(was.detail)
            outcomes.append(_subject_outcome(item, problems, was.affected if was else 0))
        last_due = max((whole.due(b) for b in whole.inside), default=None)
        earlier = erased.gone_by if erased.gone_by and aware(erased.gone_by) > checked.now else None
        return BatchStepOutcome(
            step_id=batch.step.id,
            outcomes=outcomes,
            evidence={
                **_batch_evidence(batch, checked.found),
                "subject_blobs_remaining": len(checked.found.owner),
                **_whole_evidence(whole),
            },
            detail=_window_detail(
                len(whole.inside), last_due, _SoftDelete(None, ""), whole, checking=True
            ),
            gone_by=_latest(last_due, earlier),
        )

    async def sweep(self, batch: SweepBatch) -> SweepResult:
        """One page of a retention sweep: the locator's backups past their period deleted, those
        under an obligation or a hold kept (`lethe.activities.blob_retention`)."""
        from lethe.activities.blob_retention import sweep_backups  # it imports this module

        return await sweep_backups(self._service, self._endpoint, batch)

    # --- the steps ---------------------------------------------------------------------------

    async def _erase(self, batch: BatchStepRequest, journal: Journal) -> _Erased:
        """The effect for a batch: its subjects' blobs and the whole backups past the window
        deleted, the plan (counts) heartbeated and confirmed first, the result after."""
        locator = self.locator(batch)
        now = datetime.now(UTC)
        size = len(batch.subjects)
        base, unconfirmed = _earlier_each(journal, size)
        try:
            with self._errors(batch, locator):
                container, soft_delete = await asyncio.gather(
                    self._container(locator), self._soft_delete()
                )
                found = await self._find(container, batch, locator)
                whole = await self._whole_backups(container, batch, locator, now)
                planned = found.each(size)
                journal.progress["found_each"] = [
                    max(a, b) for a, b in zip(planned, unconfirmed, strict=True)
                ]
                await journal.plan(subject_blobs=len(found.owner), whole_backups=len(whole.past))
                subject = _Deletions()
                if locator.subject_tag or locator.subject_prefix:
                    subject = await self._delete_subject_blobs(
                        container, list(found.owner), journal
                    )
                expired = await self._expire(container, whole.past, journal)
                versions_note, versions_deleted = await self._delete_versions(
                    container, subject.names + expired.names
                )
        except LetheError:
            journal.failed()
            raise
        made = found.each(size, subject.fresh)
        each = [b + max(n, u) for b, n, u in zip(base, made, unconfirmed, strict=True)]
        journal.progress.pop("found_each", None)
        journal.progress["each"] = each
        journal.erased(
            subject_blobs_deleted=subject.deleted,
            whole_backups_deleted=expired.deleted,
            versions_deleted=versions_deleted,
        )
        return _Erased(found, subject, expired, whole, soft_delete, versions_note, each, now)

    def _erase_evidence(self, done: _Erased, journal: Journal) -> Evidence:
        """What an erase tells of the blobs it deleted and the whole backups it judged."""
        whole, subject, expired = done.whole, done.subject, done.expired
        return {
            "subject_blobs_deleted": journal.total("subject_blobs_deleted", "subject_blobs"),
            "subject_blobs_already_gone": subject.already_gone,
            "whole_backups_deleted": journal.total("whole_backups_deleted", "whole_backups"),
            "whole_backups_already_gone": expired.already_gone,
            "whole_backups_inside_window": whole.count(len(whole.inside)),
            "whole_backups_next_due_at": _iso(
                min((whole.due(b) for b in whole.inside), default=None)
            ),
            "whole_backups_after_erasure": whole.count(whole.after),
            "whole_backups": whole.note,
            "held": sum(subject.held.values()) + sum(expired.held.values()),
            "soft_delete": done.soft_delete.note,
            "soft_delete_days": done.soft_delete.days,
            "versions": done.versions_note,
            "versions_deleted": journal.total("versions_deleted"),
            **journal.evidence(),
        }

    async def _check(self, batch: BatchStepRequest) -> _Checked:
        """What is left of a batch's blobs and of the whole backups; touches nothing."""
        locator = self.locator(batch)
        now = datetime.now(UTC)
        with self._errors(batch, locator):
            container = await self._container(locator)
            found = await self._find(container, batch, locator)
            whole = await self._whole_backups(container, batch, locator, now)
        return _Checked(found, whole, now)

    async def _container(self, locator: BlobBackupLocator) -> ContainerClient:
        container = self._service.get_container_client(locator.container)
        await container.get_container_properties()  # ContainerNotFound -> SchemaMismatch
        return container

    async def _soft_delete(self) -> _SoftDelete:
        try:
            properties = await self._service.get_service_properties()
        except HttpResponseError as exc:
            if is_unsupported(exc) or exc.status_code == 403:
                return _SoftDelete(
                    None,
                    "not checked: the service does not report its delete retention policy "
                    f"(HTTP {exc.status_code}); deleted blobs may stay recoverable",
                )
            raise
        policy = properties.get("delete_retention_policy")
        if policy is None or not policy.enabled:
            return _SoftDelete(None, "off: deleted blobs are not kept")
        days = int(policy.days or 0)
        return _SoftDelete(days, f"on: deleted blobs stay recoverable for {days} day(s)")

    async def _subject_blobs(
        self, container: ContainerClient, request: StepRequest, locator: BlobBackupLocator
    ) -> list[str]:
        """The names of one subject's blobs."""
        return list((await self._find(container, batch_of_one(request), locator)).owner)

    async def _find(
        self, container: ContainerClient, batch: BatchStepRequest, locator: BlobBackupLocator
    ) -> _Found:
        """The batch's subjects' own blobs: by tag, and under each one's rendered prefix."""
        found = _Found()
        if locator.subject_tag:
            await self._find_by_tag(container, batch, locator.subject_tag, found)
        if locator.subject_prefix:
            await self._find_by_prefix(container, batch, locator.subject_prefix, found)
        return found

    async def _find_by_tag(
        self, container: ContainerClient, batch: BatchStepRequest, tag: str, found: _Found
    ) -> None:
        """Tagged blobs: one range query for a batch where it pays, else one query a subject
        (the service's tag filter has no OR), CONCURRENCY at once."""
        refs = {item.subject_ref: index for index, item in enumerate(batch.subjects)}
        if not all(_TAG_VALUE.fullmatch(ref) for ref in refs):
            raise BlobServiceError(
                "the subject reference is not a valid blob index tag value "
                "(letters, digits, space and + - . / : = _ only)"
            )
        budget = len(refs) // RANGE_PAGES_PER_SUBJECTS
        if budget and await self._find_in_range(container, tag, refs, budget, found):
            return
        found.lookup = "per subject"

        async def one(ref: str, index: int) -> None:
            query = _tag_query(tag, ref)
            found.add([b.name async for b in container.find_blobs_by_tags(query)], index)
            found.calls += 1

        await bounded([one(ref, index) for ref, index in refs.items()])

    async def _find_in_range(
        self,
        container: ContainerClient,
        tag: str,
        refs: dict[str, int],
        budget: int,
        found: _Found,
    ) -> bool:
        """The batch's tagged blobs by one query from its least reference to its greatest,
        keeping those whose tag is one of the batch's. References are uniform, so the range
        spans most blobs tagged at all: False (nothing kept) once it has read `budget` pages
        and more remain."""
        query = f"\"{tag}\" >= '{min(refs)}' AND \"{tag}\" <= '{max(refs)}'"
        kept: dict[str, int] = {}
        pages = container.find_blobs_by_tags(query, results_per_page=RANGE_PAGE).by_page()
        read = 0
        async for page in pages:
            read += 1
            if read > budget:
                found.calls += read
                return False
            async for item in page:
                index = refs.get((item.tags or {}).get(tag, ""))
                if index is not None:
                    kept.setdefault(item.name, index)
        found.calls += read
        found.lookup = "range"
        for name, index in kept.items():
            found.add([name], index)
        return True

    async def _find_by_prefix(
        self, container: ContainerClient, batch: BatchStepRequest, template: str, found: _Found
    ) -> None:
        """Blobs under each subject's rendered prefix: one listing a subject, CONCURRENCY at
        once. In a batch, a subject whose prefix cannot be made is `unfindable` (alone, the
        error is raised)."""
        _check_prefix_ends_after_placeholder(batch, template)

        async def one(index: int, item: BulkSubject) -> None:
            try:
                prefix = render(template, item.subject.template_values(item.subject_ref))
            except MissingIdentity as exc:
                if len(batch.subjects) == 1:
                    raise
                found.unfindable[index] = f"subject_prefix: {exc}"
                return
            found.add([b.name async for b in container.list_blobs(name_starts_with=prefix)], index)
            found.calls += 1

        await bounded([one(index, item) for index, item in enumerate(batch.subjects)])

    async def _whole_backups(
        self,
        container: ContainerClient,
        batch: BatchStepRequest,
        locator: BlobBackupLocator,
        now: datetime,
    ) -> _WholeBackups:
        """The whole backups, dated, judged once for the batch: listed only when the erasure
        found at least one of its subjects."""
        started = aware(batch.erasure_started_at)
        window = aware(batch.window_ends_at) - started
        past: list[_Backup] = []
        inside: list[_Backup] = []
        after = 0
        if locator.whole_backup_prefix is None:
            return _WholeBackups(past=past, inside=inside, after=after, window=window)
        if not any(subject_found(batch, item) for item in batch.subjects):
            # They hold everyone: expiring them for subjects who are in none of them (an id
            # such as `*`) would destroy every other subject's backups. Not even listed.
            return _WholeBackups(past, inside, after, window, note=NOT_FOUND_NOTE)
        async for blob in container.list_blobs(name_starts_with=locator.whole_backup_prefix):
            # Creation-Time has one-second precision: a backup stamped in the second the
            # erasure began may have been taken before it, so it counts as holding the subject.
            created = aware(blob.creation_time or blob.last_modified)
            if created > started:
                after += 1
            elif created <= now - window:
                past.append(_Backup(blob.name, created))
            else:
                inside.append(_Backup(blob.name, created))
        return _WholeBackups(past, inside, after, window, note=WHOLE_BACKUPS_DATED)

    async def _delete_subject_blobs(
        self, container: ContainerClient, names: list[str], journal: Journal
    ) -> _Deletions:
        """The effect on the subjects' own blobs: each deleted with its snapshots."""
        return await self._delete(container, names, journal)

    async def _expire(
        self, container: ContainerClient, past: list[_Backup], journal: Journal
    ) -> _Deletions:
        """The effect on whole backups: those taken before the erasure and past the window."""
        return await self._delete(container, [backup.name for backup in past], journal)

    async def _delete(
        self, container: ContainerClient, names: list[str], journal: Journal
    ) -> _Deletions:
        """The effect: delete each blob with its snapshots (a 404 is one already gone)."""
        result = _Deletions()

        async def delete(name: str) -> None:
            try:
                await container.delete_blob(name, delete_snapshots="include")
                result.deleted += 1
                result.names.append(name)
                result.fresh.append(name)
            except ResourceNotFoundError:
                result.already_gone += 1
                result.names.append(name)
            except HttpResponseError as exc:
                reason = HOLD_CODES.get(service_code(exc))
                if reason is None:
                    raise
                result.held[reason] = result.held.get(reason, 0) + 1
                result.refused[name] = reason
            journal.alive(blobs_deleted=result.deleted, blobs_already_gone=result.already_gone)

        await bounded([delete(name) for name in names])
        return result

    async def _delete_versions(
        self, container: ContainerClient, names: list[str]
    ) -> tuple[str, int]:
        """Delete the earlier versions of deleted blobs where the service lists them."""
        if not names:
            return "nothing deleted, so no versions to look for", 0

        async def versions(name: str) -> int:
            # Only items that carry a version id are versions; Azurite lists none and would
            # apply a delete with a version id to the current blob, so nothing else is deleted.
            found = [
                item.version_id
                async for item in container.list_blobs(name_starts_with=name, include=["versions"])
                if item.name == name and item.version_id and not item.is_current_version
            ]
            for version_id in found:
                with suppress(ResourceNotFoundError):
                    await container.delete_blob(name, version_id=version_id)
            return len(found)

        try:
            counts = await bounded([versions(name) for name in names])
        except HttpResponseError as exc:
            if is_unsupported(exc) or exc.status_code == 400:
                return (
                    "not checked: the service does not support versioning "
                    f"(HTTP {exc.status_code})",
                    0,
                )
            raise
        deleted = sum(counts)
        if deleted:
            return f"checked: {deleted} earlier version(s) deleted", deleted
        return "checked: none listed (versioning is off, or the service keeps no versions)", 0


async def bounded(work: list[Awaitable[T]]) -> list[T]:
    """The results of `work` in order, at most CONCURRENCY of them awaited at once."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(item: Awaitable[T]) -> T:
        async with gate:
            return await item

    return await asyncio.gather(*(one(item) for item in work))


def _tag_query(tag: str, ref: str) -> str:
    return f"\"{tag}\" = '{ref}'"


def _check_prefix_ends_after_placeholder(
    request: StepRequest | BatchStepRequest, template: str
) -> None:
    # `exports/{subject_id}` for subject 1 would also match `exports/10/...`: another
    # subject's blobs. Only the subject reference, always 32 hex digits, may end a prefix.
    if template.endswith("}") and not template.endswith("{subject_ref}"):
        raise ConfigurationError(
            f"step {request.step.id!r}: subject_prefix {template!r} ends with a placeholder, so "
            "it would also match other subjects whose id starts the same way; end it with a "
            "delimiter such as '/'"
        )


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _latest(*moments: datetime | None) -> datetime | None:
    return max((aware(m) for m in moments if m is not None), default=None)


def _merge(*counts: dict[str, int]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for count in counts:
        for reason, n in count.items():
            merged[reason] = merged.get(reason, 0) + n
    return merged


def _held_detail(held: dict[str, int]) -> str:
    parts = [f"{n} blob(s) under {reason}" for reason, n in sorted(held.items())]
    return (
        "the service refused to delete "
        + ", ".join(parts)
        + ": the subject's data stays until the hold is released or the policy expires"
    )


def _earlier_each(journal: Journal, size: int) -> tuple[list[int], list[int]]:
    """Each subject's blobs that earlier attempts deleted (their last result that arrived), and
    those an earlier attempt was about to delete when its heartbeats stopped."""
    earlier = journal.earlier_progress
    base = counts_of(earlier.get("each"), size)
    if journal.earlier != "planned":
        return base, [0] * size
    return base, counts_of(earlier.get("found_each"), size)


def _gone_by(done: _Erased, journal: Journal) -> datetime | None:
    """When what the erase leaves is due: the last backup inside the window, and the soft
    delete's retention of what it (or an earlier attempt) deleted."""
    # Deleted by this attempt or an earlier one (which may have, when its heartbeats are lost).
    deleted_now = (
        journal.affected("subject_blobs_deleted", "whole_backups_deleted", "versions_deleted")
        or journal.earlier == "lost"
    )
    days = done.soft_delete.days
    lingering = done.now + timedelta(days=days) if days and deleted_now else None
    last_due = max((done.whole.due(b) for b in done.whole.inside), default=None)
    return _latest(lingering, last_due)


def _erased_detail(done: _Erased, journal: Journal) -> str:
    last_due = max((done.whole.due(b) for b in done.whole.inside), default=None)
    window = _window_detail(len(done.whole.inside), last_due, done.soft_delete, done.whole)
    return "; ".join(d for d in (window, _earlier_detail(journal)) if d)


def _whole_evidence(whole: _WholeBackups) -> Evidence:
    """What a check tells of the whole backups (None: not counted, since not touched)."""
    return {
        "whole_backups_past_window": whole.count(len(whole.past)),
        "remaining_inside_window": whole.count(len(whole.inside)),
        "whole_backups_after_erasure": whole.count(whole.after),
        "whole_backups": whole.note,
    }


def _batch_evidence(batch: BatchStepRequest, found: _Found) -> Evidence:
    """What only a batch's evidence tells: its subjects, and how their blobs were found."""
    return {
        "subjects": len(batch.subjects),
        "subjects_found": sum(subject_found(batch, item) for item in batch.subjects),
        "subjects_unfindable": len(found.unfindable),
        "tag_lookup": found.lookup,
        "lookup_calls": found.calls,
    }


def _remaining_problems(remaining: int) -> list[str]:
    return [f"{remaining} of the subject's blob(s) remain"] if remaining else []


def _past_problem(whole: _WholeBackups) -> str:
    return (
        f"{len(whole.past)} whole backup(s) taken before the erasure are past the window and "
        "still exist"
    )


def _whole_problem(held: dict[str, int], whole: _WholeBackups) -> str:
    """Why whole backups fail every found subject of a batch: refused, or still there."""
    if held:
        return "whole backups: " + _held_detail(held)
    return _past_problem(whole) if whole.past else ""


def _subject_outcome(item: BulkSubject, problems: list[str], affected: int) -> SubjectOutcome:
    return SubjectOutcome(
        subject_ref=item.subject_ref,
        status="failed" if problems else "done",
        affected=affected,
        detail="; ".join(problems),
    )


def _earlier_detail(journal: Journal) -> str:
    """What the detail says of earlier attempts of a retried erase; "" on a first attempt."""
    earlier = journal.earlier
    if earlier == "planned":
        return (
            f"an earlier attempt had found {journal.unconfirmed.get('subject_blobs', 0)} "
            f"subject blob(s) and {journal.unconfirmed.get('whole_backups', 0)} whole "
            "backup(s) past the window and was about to delete them when its worker was lost: "
            "how many it deleted is not known"
        )
    if earlier == "lost":
        return (
            "no heartbeat of an earlier attempt arrived, so what it deleted, if anything, is "
            "not known"
        )
    return ""


def _window_detail(
    inside: int,
    last_due: datetime | None,
    soft: _SoftDelete,
    whole: _WholeBackups,
    *,
    checking: bool = False,
) -> str:
    parts = []
    if not whole.touched:
        parts.append(
            "whole backups not checked: they are not touched, since the subject was found in "
            "no system and is not on the forget-list"
            if checking
            else f"whole backups {NOT_FOUND_NOTE}"
        )
    if inside and last_due is not None:
        parts.append(
            f"{inside} whole backup(s) taken before the erasure are inside the window; the last "
            f"is due at {last_due.isoformat()}: run erase and verify again then"
        )
    if soft.days:
        parts.append(f"soft delete keeps deleted blobs recoverable for {soft.days} day(s)")
    elif soft.note.startswith("not checked"):
        parts.append("soft delete " + soft.note)
    return "; ".join(parts)
