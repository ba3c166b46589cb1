"""Reading a workflow's history as the server stores it: every payload, wherever it sits."""

from __future__ import annotations

from collections.abc import Iterator

from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload
from temporalio.client import WorkflowHistory


def iter_payloads(message: Message, *, search_attributes: bool = True) -> Iterator[Payload]:
    """Every Payload inside a protobuf message, depth first, in maps and lists too.

    Search attributes are payloads the server indexes in clear; leave them out with
    `search_attributes=False`.
    """
    if isinstance(message, Payload):
        yield message
        return
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if not search_attributes and field.message_type.name == "SearchAttributes":
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
            yield from iter_payloads(item, search_attributes=search_attributes)


def history_payloads(history: WorkflowHistory, *, search_attributes: bool = True) -> list[Payload]:
    """Every payload of every event of a fetched history (search attributes too, unless told)."""
    return [
        payload
        for event in history.events
        for payload in iter_payloads(event, search_attributes=search_attributes)
    ]
