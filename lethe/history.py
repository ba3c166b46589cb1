"""Reading a workflow's history as the server stores it: every payload, wherever it sits."""

from __future__ import annotations

from collections.abc import Iterator

from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload
from temporalio.client import WorkflowHistory


def iter_payloads(message: Message) -> Iterator[Payload]:
    """Every Payload inside a protobuf message, depth first, in maps and lists too."""
    if isinstance(message, Payload):
        yield message
        return
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            values = value.values()
            if field.message_type.fields_by_name["value"].message_type is None:
                continue
        elif field.is_repeated:
            values = value
        else:
            values = [value]
        for item in values:
            yield from iter_payloads(item)


def history_payloads(history: WorkflowHistory) -> list[Payload]:
    """Every payload of every event of a fetched history."""
    return [payload for event in history.events for payload in iter_payloads(event)]
