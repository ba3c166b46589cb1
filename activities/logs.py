"""The log connector: drops or redacts a subject's records in JSON-lines log blobs.

Logs are block blobs of one JSON object per line, in a container under a prefix. A record is
the subject's when one of the locator's `fields` holds the subject's value for it. Each blob
that holds such a record is rewritten as a whole and swapped in only if nobody wrote to it
since it was read (an If-Match on its etag); a concurrent writer makes the swap fail, and the
blob is read again and rewritten, so their lines are never lost. Preflight reads only: the
container, the credentials and what they allow, and that the request gives a value to find
records by.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Literal

from azure.core import MatchConditions
from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError
from azure.storage.blob import BlobProperties, BlobType, ContentSettings
from azure.storage.blob.aio import BlobClient, ContainerClient
from temporalio import activity

from activities.blob import (
    BlobConnector,
    beat,
    blob_errors,
    blob_service,
    container_problems,
    error_code,
    sas_problems,
)
from activities.common import connector_activities, retained_outcome, verdict
from classification.datamap import LogLocator, MissingIdentity
from lethe.contracts import Evidence, StepOutcome, StepRequest
from lethe.errors import ConfigurationError, LetheError

REDACTED = "[redacted]"
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
    """Records left alone whose mapped fields already say `[redacted]`."""
    records: int = 0
    """Lines that are JSON objects. None in a non-empty blob: it could not be checked."""

    def unreadable(self, content: bytes) -> bool:
        """The blob holds something, but no JSON record (compressed, or another format)."""
        return not self.records and bool(content.strip())


@dataclass
class _Progress:
    """Counts so far; heartbeated with the index of the last blob done, to resume from."""

    last_done: int = -1
    affected: int = 0
    scanned: int = 0
    rewritten: int = 0
    unparsed: int = 0
    conflicts: int = 0
    not_rewritable: int = 0
    unreadable: int = 0

    @classmethod
    def resumed(cls) -> _Progress:
        """The progress an earlier attempt of this activity heartbeated, or a fresh start."""
        if not activity.in_activity():
            return cls()
        details = activity.info().heartbeat_details
        if not details or not isinstance(details[0], dict):
            return cls()
        saved = details[0]
        names = set(asdict(cls()))
        values = {k: v for k, v in saved.items() if k in names and isinstance(v, int)}
        return cls(**values)


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


def rewrite(content: bytes, values: dict[str, str], fields: list[str], mode: Mode) -> Rewrite:
    """Drop (or redact `fields` of) the records where a field of `values` holds its value.

    Every other line, JSON or not, is kept byte for byte.
    """
    out: list[bytes] = []
    matched = unparsed = redacted = records = 0
    for line in content.split(b"\n"):
        record = _record(line)
        if record is None:
            unparsed += bool(line.strip())
            out.append(line)
            continue
        records += 1
        if not any(_holds(record.get(name), value) for name, value in values.items()):
            redacted += any(record.get(name) == REDACTED for name in fields)
            out.append(line)
            continue
        matched += 1
        if mode == "redact":
            for name in fields:
                if name in record:
                    record[name] = REDACTED
            ending = b"\r" if line.endswith(b"\r") else b""
            out.append(json.dumps(record, ensure_ascii=False).encode() + ending)
    return Rewrite(b"\n".join(out) if matched else content, matched, unparsed, redacted, records)


def _record(line: bytes) -> dict[str, Any] | None:
    if not line.strip():
        return None
    try:
        parsed = json.loads(line)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _holds(field_value: object, value: str) -> bool:
    if isinstance(field_value, str):
        return field_value == value
    # A numeric id logged as a number is still the subject's id.
    if isinstance(field_value, int) and not isinstance(field_value, bool):
        return str(field_value) == value
    return False


class LogRedactor(BlobConnector):
    """Drops (`delete`) or redacts (`redact`, `anonymize`) a subject's records in log blobs.

    Blobs are taken in name order; after each one the activity heartbeats the index of the
    last blob done and its counts, and a retried attempt resumes after it. Blobs without the
    subject's records are read but never rewritten. Only block blobs can be swapped whole: an
    append or page blob holding the subject's records is counted and makes the step `failed`.
    """

    async def preflight(self, request: StepRequest) -> list[str]:
        """Touching nothing: the action is one logs take, the request gives a value to find
        records by, what the connection's signature allows, the container exists and the
        credentials open it, and listing under the prefix works."""
        action = request.step.action
        if action == "retain":
            return []
        locator = _locator(request)
        system = request.step.system
        problems: list[str] = []
        if action not in _MODES:
            problems.append(
                f"logs system {system!r}: logs cannot {action!r}; use delete, redact, "
                "anonymize or retain"
            )
        try:
            subject_values(request, locator)
        except MissingIdentity as exc:
            problems.append(f"logs system {system!r}: {exc}")
        needs = {"r": "read", "l": "list", "w": "write"}
        problems += sas_problems(self._connection, system, needs, kind="logs")
        problems += await container_problems(
            self._connection, system, locator.container, [locator.prefix], kind="logs"
        )
        return problems

    async def erase(self, request: StepRequest) -> StepOutcome:
        """Drop or redact the subject's records in every log blob under the prefix; or retain."""
        action = request.step.action
        if action == "retain":
            return retained_outcome(request)
        mode = _MODES.get(action)
        if mode is None:
            raise ConfigurationError(
                f"step {request.step.id!r}: logs cannot {action!r}; use delete, redact, "
                "anonymize or retain"
            )
        locator = _locator(request)
        values = subject_values(request, locator)
        progress = _Progress.resumed()
        resumed_from = progress.last_done + 1
        with self._errors(request, locator):
            container = blob_service(self._connection).get_container_client(locator.container)
            names = await self._blob_names(container, locator)
            for index in range(resumed_from, len(names)):
                blob = container.get_blob_client(names[index])
                await self._erase_blob(blob, values, list(locator.fields), mode, progress)
                progress.last_done = index
                beat(asdict(progress))

        detail = ""
        if progress.not_rewritable:
            detail = (
                f"{progress.not_rewritable} append or page blob(s) hold the subject's records; "
                "only block blobs can be rewritten atomically, so they were left unchanged"
            )
        return StepOutcome(
            step_id=request.step.id,
            status="failed" if progress.not_rewritable else "running",
            affected=progress.affected,
            evidence={
                "action": action,
                "blobs_scanned": progress.scanned,
                "blobs_rewritten": progress.rewritten,
                "records_dropped" if mode == "drop" else "records_redacted": progress.affected,
                "unparsed_lines": progress.unparsed,
                "write_conflicts_retried": progress.conflicts,
                "blobs_not_rewritable": progress.not_rewritable,
                "blobs_without_json": progress.unreadable,
                "resumed_from_blob": resumed_from,
            },
            detail=detail,
        )

    async def verify(self, request: StepRequest, erased: StepOutcome) -> StepOutcome:
        """Rescan every log blob: no record may still carry the subject's values."""
        if request.step.action == "retain" or erased.status == "retained":
            return erased.model_copy(update={"verified": False})
        locator = _locator(request)
        values = subject_values(request, locator)
        fields = list(locator.fields)
        matching = unparsed = redacted = blobs = unreadable = 0
        with self._errors(request, locator):
            container = blob_service(self._connection).get_container_client(locator.container)
            for index, name in enumerate(await self._blob_names(container, locator)):
                read = await _read(container.get_blob_client(name))
                if read is not None:
                    found = rewrite(read[0], values, fields, "drop")
                    matching += found.matched
                    unparsed += found.unparsed
                    redacted += found.redacted
                    unreadable += found.unreadable(read[0])
                    blobs += 1
                beat({"verified_blobs": index + 1})
        evidence: Evidence = {
            "blobs_scanned": blobs,
            "records_matching": matching,
            "unparsed_lines": unparsed,
            "records_redacted_present": redacted,
            "blobs_without_json": unreadable,
        }
        problems: list[str] = []
        if matching:
            problems.append(f"{matching} log record(s) still carry the subject's values")
        if unreadable:
            problems.append(
                f"{unreadable} blob(s) under the prefix hold no JSON lines (compressed, or "
                "another format), so they could not be checked"
            )
        if problems and erased.detail:
            problems.append(erased.detail)
        return verdict(erased, evidence, problems)

    # --- one blob ------------------------------------------------------------------------------

    async def _erase_blob(
        self,
        blob: BlobClient,
        values: dict[str, str],
        fields: list[str],
        mode: Mode,
        progress: _Progress,
    ) -> None:
        for attempt in range(ATTEMPTS):
            read = await self._read(blob)
            if read is None:  # deleted since it was listed: nothing of the subject's is left
                return
            content, etag, properties = read
            if attempt == 0:
                progress.scanned += 1
            result = rewrite(content, values, fields, mode)
            if attempt == 0:
                progress.unparsed += result.unparsed
                progress.unreadable += result.unreadable(content)
            if not result.matched:
                return
            if properties.blob_type != BlobType.BLOCKBLOB:
                progress.not_rewritable += 1
                return
            try:
                await blob.upload_blob(
                    result.content,
                    blob_type=BlobType.BLOCKBLOB,
                    overwrite=True,
                    etag=etag,
                    match_condition=MatchConditions.IfNotModified,
                    content_settings=ContentSettings(
                        content_type=properties.content_settings.content_type,
                        content_encoding=properties.content_settings.content_encoding,
                        content_language=properties.content_settings.content_language,
                        content_disposition=properties.content_settings.content_disposition,
                        cache_control=properties.content_settings.cache_control,
                    ),
                    metadata=properties.metadata,
                    tags=await blob.get_blob_tags() if properties.tag_count else None,
                )
            except ResourceModifiedError:
                progress.conflicts += 1
                continue
            progress.affected += result.matched
            progress.rewritten += 1
            return
        raise LogBlobBusy(
            f"a log blob changed {ATTEMPTS} times while it was being rewritten; "
            "the step will run again"
        )

    async def _read(self, blob: BlobClient) -> tuple[bytes, str, BlobProperties] | None:
        """The blob's content, etag and properties; None when it no longer exists."""
        return await _read(blob)

    @contextmanager
    def _errors(self, request: StepRequest, locator: LogLocator) -> Iterator[None]:
        with blob_errors(self._endpoint, request.step.system, locator.container):
            yield

    async def _blob_names(self, container: ContainerClient, locator: LogLocator) -> list[str]:
        return [blob.name async for blob in container.list_blobs(name_starts_with=locator.prefix)]


async def _read(blob: BlobClient) -> tuple[bytes, str, BlobProperties] | None:
    try:
        download = await blob.download_blob()
        content = await download.readall()
    except ResourceNotFoundError as exc:
        if error_code(exc) == "ContainerNotFound":
            raise
        return None
    return content, download.properties.etag, download.properties


def _locator(request: StepRequest) -> LogLocator:
    locator = request.step.locator
    if not isinstance(locator, LogLocator):
        raise ConfigurationError(
            f"step {request.step.id!r} is of kind {request.step.kind!r}, not a log locator"
        )
    return locator


erase, verify, preflight = connector_activities("logs", LogRedactor.for_connection)
