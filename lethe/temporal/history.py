"""Reading a workflow's history as the server stores it: every payload, wherever it sits; and,
once decrypted, the subject's identifiers redacted out of it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TypeGuard

from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload
from temporalio.client import WorkflowHistory


def _bookkeeping(message: Message, field_name: str, key: object = None) -> bool:
    """Payloads the server and the SDK write for themselves, never from a workflow's data:
    search attributes (indexed in clear), a local activity marker's metadata (its `data`
    entry: sequence number, attempt, activity type; the result is a separate, encrypted entry)
    and a `workflow.patched` marker's `patch-data` (the patch id the code names)."""
    if field_name == "search_attributes":
        return True
    if message.DESCRIPTOR.name != "MarkerRecordedEventAttributes":
        return False
    return key == "data" or (
        getattr(message, "marker_name", "") == "core_patch" and key == "patch-data"
    )


def iter_payloads(message: Message, *, user_only: bool = False) -> Iterator[Payload]:
    """Every Payload inside a protobuf message, depth first, in maps and lists too.

    With `user_only`, the server's and the SDK's bookkeeping payloads are left out.
    """
    if isinstance(message, Payload):
        yield message
        return
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if user_only and _bookkeeping(message, field.name):
            continue
        if field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].message_type is None:
                continue
            values = [
                item
                for key, item in value.items()
                if not (user_only and _bookkeeping(message, field.name, key))
            ]
        elif field.is_repeated:
            values = value
        else:
            values = [value]
        for item in values:
            yield from iter_payloads(item, user_only=user_only)


def history_payloads(history: WorkflowHistory, *, user_only: bool = False) -> list[Payload]:
    """Every payload of every event of a fetched history (only the workflow's own, if told)."""
    return [
        payload for event in history.events for payload in iter_payloads(event, user_only=user_only)
    ]


# --- redacting the subject out of decrypted payloads -------------------------------------------

SUBJECT_ID_MARK = "[subject id]"
SUBSTRING_MIN_CHARS = 6
"""Identifiers at least this long are also replaced inside longer strings (a failure message,
a stack trace); shorter ones only where a whole string equals them, since `p-1` would match
`step-1`."""
_SUBJECT_FIELDS = frozenset({"tenant", "subject_id", "identities"})


def identity_mark(name: str) -> str:
    """What an identity's value becomes: `[identity email]`."""
    return f"[identity {name}]"


def _walk(value: object) -> Iterator[object]:
    yield value
    if isinstance(value, dict):
        for item in value.values():
            yield from _walk(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _walk(item)


def _is_subject(value: object) -> TypeGuard[dict[str, object]]:
    """A `Subject` as the JSON converter writes it: tenant, subject id and identities."""
    return (
        isinstance(value, dict)
        and isinstance(value.get("subject_id"), str)
        and set(value) <= _SUBJECT_FIELDS
    )


def subject_markers(values: Iterable[object]) -> dict[str, str]:
    """Every subject id and identity value found in decoded payloads -> its marker.

    Subjects are found wherever they sit (an ErasureStart's request, a RegionJob, a
    StepRequest); a value that is both an id and an identity is marked as the id.
    """
    found: dict[str, str] = {}
    subjects = [item for value in values for item in _walk(value) if _is_subject(item)]
    for subject in subjects:
        identities = subject.get("identities")
        if isinstance(identities, dict):
            for name, identity in identities.items():
                if isinstance(identity, str):
                    found.setdefault(identity, identity_mark(str(name)))
    for subject in subjects:
        found[str(subject["subject_id"])] = SUBJECT_ID_MARK
    found.pop("", None)
    return found


def redact_text(text: str, markers: Mapping[str, str]) -> str:
    """`text` with every identifier replaced by its marker: all of it when it equals one, and
    each occurrence of the longer ones (longest first) inside it."""
    if text in markers:
        return markers[text]
    for clear in sorted(markers, key=len, reverse=True):
        if len(clear) >= SUBSTRING_MIN_CHARS and clear in text:
            text = text.replace(clear, markers[clear])
    return text


def redact(value: object, markers: Mapping[str, str]) -> object:
    """A decoded payload with the subject's identifiers replaced by markers, wherever they are:
    a Subject's `subject_id` and `identities`, and any other string (or mapping key) that holds
    one of them. The input is not changed."""
    if _is_subject(value):
        shown: dict[str, object] = dict(value)
        shown["subject_id"] = SUBJECT_ID_MARK
        identities = value.get("identities")
        if isinstance(identities, dict):
            shown["identities"] = {str(name): identity_mark(str(name)) for name in identities}
        if "tenant" in value:
            shown["tenant"] = redact(value["tenant"], markers)
        return shown
    if isinstance(value, str):
        return redact_text(value, markers) if markers else value
    if isinstance(value, dict):
        return {
            (redact_text(k, markers) if isinstance(k, str) else k): redact(v, markers)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(item, markers) for item in value]
    return value


def request_of(values: Iterable[object]) -> tuple[str, str] | None:
    """The request id and subject reference the payloads belong to (from the first payload that
    names both: an ErasureStart, RegionJob or StepRequest), if any does."""
    for value in values:
        for item in _walk(value):
            if isinstance(item, dict):
                request_id, ref = item.get("request_id"), item.get("subject_ref")
                if isinstance(request_id, str) and isinstance(ref, str) and request_id and ref:
                    return request_id, ref
    return None
