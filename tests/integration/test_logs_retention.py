"""Retention sweeps of JSON-lines log blobs against Azurite: exactly the due lines dropped and the
rest byte-identical, obligations, undated lines, holds and scopes, a dry run that touches nothing,
a line written during the rewrite kept, a missing container named."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pytest
from azure.storage.blob import BlobProperties
from azure.storage.blob.aio import BlobClient, ContainerClient
from temporalio.exceptions import ApplicationError

from lethe.activities.clients import Clients
from lethe.activities.connectors import Connectors
from lethe.activities.logs_retention import LogSweep
from lethe.classification.datamap import LogLocator, LogRetentionDates
from lethe.contracts import Hold, ScopeMatch, SweepBatch, SweepResult, SweepTask
from tests import sweeps

from .test_logs import container

__all__ = ["container"]  # a fixture, shared with test_logs.py

LIMIT = timedelta(days=365)
NOW = datetime.now(UTC)
OLD = (NOW - timedelta(days=800)).isoformat()
RECENT = (NOW - timedelta(days=10)).isoformat()


def _line(**record: Any) -> bytes:
    return json.dumps(record).encode()


def _locator(
    container: ContainerClient,
    *,
    dated: str = "ts",
    scopes: dict[str, str] | None = None,
    tenant_field: str | None = None,
) -> LogLocator:
    return LogLocator(
        container=container.container_name,
        prefix="portal/",
        fields={"patient_id": "subject_id", "email": "identity.email"},
        tenant_field=tenant_field,
        categories=["user.unique_id"],
        retention=LogRetentionDates(created=dated, scopes=scopes or {}),
    )


def _task(
    locator: LogLocator,
    *,
    obligations: Sequence[timedelta] = (),
    nulls: Literal["report", "delete"] = "report",
    scope: Sequence[ScopeMatch] = (),
    tenants: Sequence[str] = ("st-mary",),
) -> SweepTask:
    assert locator.retention is not None
    return sweeps.sweep_task(
        locator,
        system="portal-logs",
        limit=sweeps.term("limit", LIMIT),
        obligations=[sweeps.term("obligation", period) for period in obligations],
        dates=locator.retention.triggers,
        tenants=tenants,
        scope=scope,
        nulls=nulls,
    )


def _batch(
    task: SweepTask, *, batch_size: int = 100, holds: Sequence[Hold] = (), dry_run: bool = False
) -> SweepBatch:
    return sweeps.sweep_batch(task, NOW, batch_size=batch_size, holds=holds, dry_run=dry_run)


async def _sweep(connectors: Connectors, task: SweepTask, **options: Any) -> list[SweepResult]:
    """Every call of the task (a batch's `options`), until done."""
    return await sweeps.sweep_all(connectors, _batch(task, **options))


async def _etags(container: ContainerClient) -> dict[str, str]:
    return {b.name: str(b.etag) async for b in container.list_blobs()}


@dataclasses.dataclass
class Logs:
    """Three log blobs under the prefix and one outside it; `kept` is what must remain."""

    seeded: dict[str, bytes]
    kept: dict[str, bytes]


def _join(lines: Sequence[bytes]) -> bytes:
    return b"\n".join(lines) + b"\n"


async def _seed(container: ContainerClient) -> Logs:
    mixed = [
        _line(ts=OLD, patient_id="1001", msg="login"),  # due
        _line(ts=RECENT, patient_id="1002", msg="login"),
        b"plain text, not JSON: worker started",  # undated, kept
        _line(ts=None, patient_id="1001", msg="no date"),  # undated, kept
        _line(patient_id="1002", msg="no ts at all"),  # undated, kept
        _line(ts="last tuesday", patient_id="1002"),  # undated, kept
        b'{"ts": "' + OLD.encode() + b'",   "patient_id": "1002",  "msg": "spaced"}\r',  # due
        _line(ts=int((NOW - timedelta(days=900)).timestamp() * 1000), msg="epoch ms"),  # due
        _line(ts=int((NOW - timedelta(days=5)).timestamp()), msg="epoch s"),
        b'{"ts": "' + RECENT.encode() + b'",  "msg": "odd spacing, recent"}\r',
    ]
    kept_mixed = [mixed[i] for i in (1, 2, 3, 4, 5, 8, 9)]
    all_old = [_line(ts=OLD, patient_id="1003", msg=f"old {i}") for i in range(3)]
    all_recent = [_line(ts=RECENT, patient_id="1001", msg="recent")]
    seeded = {
        "portal/1.jsonl": _join(mixed),
        "portal/2.jsonl": _join(all_old),
        "portal/3.jsonl": _join(all_recent),
        "other/1.jsonl": _join(all_old),  # outside the prefix
    }
    for name, content in seeded.items():
        await container.upload_blob(name, content, metadata={"app": "portal"})
    kept = {
        "portal/1.jsonl": _join(kept_mixed),
        "portal/3.jsonl": seeded["portal/3.jsonl"],
        "other/1.jsonl": seeded["other/1.jsonl"],
    }
    return Logs(seeded, kept)


# --- what is due goes ------------------------------------------------------------------------


async def test_due_lines_go_and_the_rest_stay_byte_identical(
    connectors: Connectors, container: ContainerClient
) -> None:
    logs = await _seed(container)
    await container.get_blob_client("portal/1.jsonl").set_blob_tags({"team": "portal"})
    untouched = (await _etags(container))["portal/3.jsonl"]
    batch = _batch(_task(_locator(container)), batch_size=2)

    results = await sweeps.sweep_all(connectors, batch)

    assert len(results) == 2  # three blobs under the prefix, two a call
    assert sweeps.totals(results) == (3 + 3, 0, 4)
    assert await sweeps.contents(container) == logs.kept  # portal/2.jsonl: all due, deleted
    assert (await _etags(container))["portal/3.jsonl"] == untouched
    rewritten = await container.get_blob_client("portal/1.jsonl").get_blob_properties()
    assert rewritten.metadata["app"] == "portal"
    assert rewritten.tag_count == 1
    tags = await container.get_blob_client("portal/1.jsonl").get_blob_tags()
    assert tags == {"team": "portal"}
    assert "1 line(s) are not JSON records" in results[0].detail
    assert all(r.samples == [] for r in results)
    first = results[0]
    assert first.first is not None and first.last is not None
    assert datetime.fromisoformat(first.first) < NOW - timedelta(days=899)
    assert datetime.fromisoformat(first.last) > NOW - timedelta(days=11)

    # The first call again (its result lost): nothing more goes; the rewritten blob's marks
    # count its lines again, the deleted blob is gone and counts none.
    again = await sweeps.sweep_once(connectors, batch)
    assert again.removed == 3
    assert await sweeps.contents(container) == logs.kept
    # A later sweep (another run) finds nothing due in what is left.
    later = await _sweep(connectors, _task(_locator(container)))
    assert sweeps.totals(later) == (0, 0, 4)
    assert await sweeps.contents(container) == logs.kept


async def test_an_obligation_keeps_lines_and_nulls_delete_takes_undated_records(
    connectors: Connectors, container: ContainerClient
) -> None:
    logs = await _seed(container)
    locator = _locator(container)

    kept = await _sweep(connectors, _task(locator, obligations=[timedelta(days=7 * 365)]))
    assert sweeps.totals(kept) == (0, 0, 4)
    assert await sweeps.contents(container) == logs.seeded

    # nulls: delete takes records without a usable date; lines that are not JSON stay.
    gone = await _sweep(connectors, _task(locator, nulls="delete"))
    assert sweeps.totals(gone) == (6 + 3, 0, 1)
    mixed = logs.seeded["portal/1.jsonl"].split(b"\n")
    assert (await sweeps.contents(container))["portal/1.jsonl"] == b"\n".join(
        mixed[i] for i in (1, 2, 8, 9, 10)
    )


async def test_a_nested_date_field(connectors: Connectors, container: ContainerClient) -> None:
    lines = [
        _line(meta={"ts": OLD}, msg="due"),
        _line(meta={"ts": RECENT}, msg="kept"),
        _line(meta="not an object", msg="undated"),
    ]
    await container.upload_blob("portal/n.jsonl", b"\n".join(lines))  # no final newline
    results = await _sweep(connectors, _task(_locator(container, dated="meta.ts")))
    assert sweeps.totals(results) == (1, 0, 1)
    assert await sweeps.contents(container) == {"portal/n.jsonl": lines[1] + b"\n" + lines[2]}


# --- holds and scopes -------------------------------------------------------------------------


async def test_a_subject_hold_keeps_their_lines_only(
    connectors: Connectors, container: ContainerClient
) -> None:
    lines = [
        _line(ts=OLD, tenant="st-mary", patient_id="1001", msg="held"),
        _line(ts=OLD, tenant="st-mary", patient_id=1001, msg="held, a numeric id"),
        _line(ts=OLD, tenant="st-luke", patient_id="1001", msg="another tenant's 1001"),
        _line(ts=OLD, tenant="st-mary", patient_id="1002", msg="not held"),
        _line(ts=OLD, tenant="st-mary", email="ada@example.org", msg="whose? kept"),
        _line(ts=OLD, tenant="st-mary", msg="nobody's"),
        _line(ts=RECENT, tenant="st-mary", patient_id="1001", msg="not due"),
    ]
    await container.upload_blob("portal/h.jsonl", _join(lines))
    locator = _locator(container, tenant_field="tenant")
    hold = sweeps.subject_hold("st-mary", "1001")

    results = await _sweep(connectors, _task(locator, tenants=["st-mary", "st-luke"]), holds=[hold])

    assert sweeps.totals(results) == (3, 3, 0)
    assert await sweeps.contents(container) == {
        "portal/h.jsonl": _join([lines[i] for i in (0, 1, 4, 6)])
    }
    assert "1001" not in repr([r.model_dump() for r in results])


async def test_tenant_holds_and_scopes_by_record_fields(
    connectors: Connectors, container: ContainerClient
) -> None:
    lines = [
        _line(ts=OLD, org="st-mary", msg="a"),
        _line(ts=OLD, org="st-luke", msg="b"),
        _line(ts=OLD, org="st-anne", msg="c"),
        _line(ts=OLD, msg="no org"),
    ]
    await container.upload_blob("portal/t.jsonl", _join(lines))
    scoped = _locator(container, scopes={"tenant": "org"})
    tenants = ["st-mary", "st-luke", "st-anne"]

    # Without a tenant field in the map, a tenant hold keeps the whole task.
    unscoped = _task(_locator(container), tenants=tenants)
    whole = await _sweep(connectors, unscoped, holds=[(hold := sweeps.hold("tenant", "st-luke"))])
    assert sweeps.totals(whole) == (0, 4, 0)
    assert hold.id in whole[0].detail
    assert await sweeps.contents(container) == {"portal/t.jsonl": _join(lines)}

    # A scope selects records by field: only st-mary's here, and st-luke's are held.
    only = [ScopeMatch(key="tenant", field="org", values=["st-mary", "st-luke"])]
    task = _task(scoped, scope=only, tenants=tenants)
    results = await _sweep(connectors, task, holds=[sweeps.hold("tenant", "st-luke")])
    assert sweeps.totals(results) == (1, 1, 0)
    assert await sweeps.contents(container) == {"portal/t.jsonl": _join(lines[1:])}

    # The others (not listed, not null), then the ones with no value.
    others = [ScopeMatch(key="tenant", field="org", others=["st-mary", "st-luke"])]
    assert sweeps.totals(await _sweep(connectors, _task(scoped, scope=others))) == (1, 0, 0)
    nulls = [ScopeMatch(key="tenant", field="org", null=True)]
    assert sweeps.totals(await _sweep(connectors, _task(scoped, scope=nulls))) == (1, 0, 0)
    assert await sweeps.contents(container) == {"portal/t.jsonl": _join(lines[1:2])}


# --- dry run, a concurrent writer, bad input ----------------------------------------------------


async def test_a_dry_run_counts_and_touches_nothing(
    connectors: Connectors, container: ContainerClient
) -> None:
    logs = await _seed(container)
    before = await _etags(container)
    results = await _sweep(connectors, _task(_locator(container)), dry_run=True)
    assert sweeps.totals(results) == (6, 0, 4)
    assert all(r.samples == [] for r in results)
    assert await _etags(container) == before
    assert await sweeps.contents(container) == logs.seeded


async def test_lines_written_during_the_rewrite_are_kept(
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    logs = await _seed(container)
    late_due = _line(ts=OLD, msg="written late, already due")
    late_kept = _line(ts=RECENT, msg="written late, in its period")

    class Racing(LogSweep):
        """Appends two lines behind the sweep's back right after its first read of a blob."""

        raced = False

        async def _read(self, blob: BlobClient) -> tuple[bytes, str, BlobProperties] | None:
            read = await super()._read(blob)
            if read is not None and not self.raced and blob.blob_name == "portal/1.jsonl":
                self.raced = True
                late = read[0] + late_due + b"\n" + late_kept + b"\n"
                await blob.upload_blob(late, overwrite=True)
            return read

    service = clients.blob_service(blob_connection)
    racing = Racing(service, "azurite", _batch(_task(_locator(container))))
    result = await racing.run()

    assert racing.raced
    assert result.removed == 3 + 1 + 3  # portal/1's, the late due line, portal/2's
    content = (await sweeps.contents(container))["portal/1.jsonl"]
    assert content == logs.kept["portal/1.jsonl"] + late_kept + b"\n"


async def test_a_missing_container_is_named_and_another_region_refused(
    connectors: Connectors, container: ContainerClient
) -> None:
    logs = await _seed(container)
    missing = _locator(container).model_copy(update={"container": sweeps.unique("missing-")})
    with pytest.raises(ApplicationError) as caught:
        await sweeps.sweep_once(connectors, _batch(_task(missing)))
    assert caught.value.type == "SchemaMismatch"
    assert caught.value.non_retryable
    assert missing.container in str(caught.value)

    with pytest.raises(ApplicationError) as caught:
        await sweeps.sweep_once(
            connectors, _batch(_task(_locator(container))), env=sweeps.region_env("us")
        )
    assert caught.value.type == "WrongRegion"
    assert await sweeps.contents(container) == logs.seeded
