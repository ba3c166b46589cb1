"""Audit review: a workflow's history decrypted through the codec, and finding requests."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client as TemporalClient
from temporalio.service import RPCError, RPCStatusCode

from lethe.contracts import TENANT_PATTERN, ErasureState, TimelineEvent
from lethe.kernel.errors import LetheError
from lethe.kernel.regions import validate_region
from lethe.temporal.history import iter_payloads


class UnknownWorkflow(LetheError):
    """No workflow has this id."""


def _event_type(event: HistoryEvent) -> str:
    return EventType.Name(event.event_type).removeprefix("EVENT_TYPE_").lower()


def _detail(event: HistoryEvent) -> str:
    attributes = event.WhichOneof("attributes")
    if attributes is None:
        return ""
    if attributes == "marker_recorded_event_attributes":
        # A local activity: the SDK's marker data (plain bookkeeping) names its type.
        meta = event.marker_recorded_event_attributes.details.get("data")
        if meta is not None and meta.payloads:
            return str(json.loads(meta.payloads[0].data).get("activity_type", ""))
    body = getattr(event, attributes)
    for field in ("activity_type", "workflow_type"):
        if body.HasField(field) if field in body.DESCRIPTOR.fields_by_name else False:
            return str(getattr(body, field).name)
    for field in ("signal_name", "timer_id"):
        if field in body.DESCRIPTOR.fields_by_name and getattr(body, field):
            return f"{field}={getattr(body, field)}"
    return ""


def _value(payload: Payload) -> object:
    if payload.metadata.get("encoding") == b"json/plain":
        return json.loads(payload.data)
    if payload.metadata.get("encoding") == b"binary/null":
        return None
    return f"<{payload.metadata.get('encoding', b'?').decode(errors='replace')}>"


async def timeline(client: TemporalClient, workflow_id: str) -> list[TimelineEvent]:
    """Every event of the workflow's latest run, with payloads decrypted by the client's codec."""
    try:
        history = await client.get_workflow_handle(workflow_id).fetch_history()
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise UnknownWorkflow(f"no workflow {workflow_id}") from None
        raise
    codec = client.data_converter.payload_codec
    events = []
    for event in history.events:
        payloads = list(iter_payloads(event))
        decoded = await codec.decode(payloads) if codec and payloads else payloads
        events.append(
            TimelineEvent(
                id=event.event_id,
                at=event.event_time.ToDatetime().replace(tzinfo=UTC),
                type=_event_type(event),
                detail=_detail(event),
                payloads=[_value(p) for p in decoded],
            )
        )
    return events


def list_query(
    *,
    region: str | None = None,
    state: ErasureState | None = None,
    since: datetime | None = None,
    tenant: str | None = None,
) -> str:
    """A visibility query for erasure requests; every value is validated, never pasted raw."""
    clauses = ["LetheKind = 'erasure'"]
    if tenant is not None:
        if not re.fullmatch(TENANT_PATTERN, tenant):
            raise ValueError(f"tenant {tenant[:60]!r} is not a tenant name")
        clauses.append(f"LetheTenant = '{tenant}'")
    if region is not None:
        clauses.append(f"LetheRegions = '{validate_region(region)}'")
    if state is not None:
        clauses.append(f"LetheStatus = '{state}'")
    if since is not None:
        clauses.append(f"StartTime >= '{since.astimezone(UTC).isoformat()}'")
    return " AND ".join(clauses)
