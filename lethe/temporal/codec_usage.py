"""Which codec keys the open workflows still need: the check before a codec key retires.

A worker that replays an open workflow (after a restart, or when its cache evicts it) decodes
every payload of the history, so a key that encrypted any of them must stay. Histories are read
raw from the server (nothing is decrypted); only each payload's key-id metadata is looked at.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from temporalio.client import Client as TemporalClient

from lethe.codec.converter import ENCODING, KEY_ID_METADATA
from lethe.temporal.history import history_payloads

OPEN_WORKFLOWS = 'ExecutionStatus="Running"'


@dataclass
class KeyUsage:
    """Open workflows by the codec key ids their histories use."""

    scanned: int = 0
    workflows_by_key: dict[str, list[str]] = field(default_factory=dict)

    def users_of(self, key_id: str) -> list[str]:
        """The open workflows whose histories hold a payload under `key_id`."""
        return self.workflows_by_key.get(key_id, [])


async def open_workflow_key_usage(
    client: TemporalClient, on_progress: Callable[[int], None] | None = None
) -> KeyUsage:
    """Scan every open workflow's history for the codec key ids of its payloads."""
    usage = KeyUsage()
    async for execution in client.list_workflows(OPEN_WORKFLOWS):
        handle = client.get_workflow_handle(execution.id, run_id=execution.run_id)
        history = await handle.fetch_history()
        used = {
            payload.metadata[KEY_ID_METADATA].decode(errors="replace")
            for payload in history_payloads(history)
            if payload.metadata.get("encoding") == ENCODING and KEY_ID_METADATA in payload.metadata
        }
        for key_id in used:
            usage.workflows_by_key.setdefault(key_id, []).append(execution.id)
        usage.scanned += 1
        if on_progress is not None:
            on_progress(usage.scanned)
    return usage
