"""Reading a workflow's history as the server stores it: every payload, wherever it sits."""

from __future__ import annotations

from collections.abc import Iterator

from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload
from temporalio.client import WorkflowHistory


def _bookkeeping(message: Message, field_name: str, key: object = None) -> bool:
    """Payloads the server and the SDK write for themselves, never from a workflow's data:
    search attributes (indexed in clear) and a local activity marker's metadata (its `data`
    entry: sequence number, attempt, activity type; the result is a separate, encrypted entry)."""
    if field_name == "search_attributes":
        return True
    return message.DESCRIPTOR.name == "MarkerRecordedEventAttributes" and key == "data"


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
