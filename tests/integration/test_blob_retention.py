"""Retention sweeps of blob backups against Azurite: due backups deleted page by page, the rest
byte-identical; obligations, holds, dates by creation time or last change; a dry run touches
nothing; a blob replaced after listing stays; a missing container is named."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.storage.blob.aio import ContainerClient
from temporalio.exceptions import ApplicationError

from lethe.activities.blob_retention import BackupSweep, _Counts, _Due
from lethe.activities.clients import Clients
from lethe.activities.connectors import Connectors
from lethe.classification.datamap import BlobBackupLocator
from lethe.contracts import HoldScope, SweepResult, SweepTask
from tests import sweeps

from .test_blob import container, service

__all__ = ["container", "service"]  # fixtures, shared with test_blob.py

LIMIT = timedelta(days=30)


def _task(
    locator: BlobBackupLocator,
    *,
    dated: str = "last_modified",
    obligations: Sequence[timedelta] = (),
) -> SweepTask:
    return sweeps.sweep_task(
        locator,
        limit=sweeps.term("limit", LIMIT),
        obligations=[sweeps.term("obligation", period) for period in obligations],
        dates={"created": dated},
    )


async def _sweep(
    connectors: Connectors, task: SweepTask, now: datetime, **options: Any
) -> list[SweepResult]:
    """Every call of the task as of `now` (a batch's `options`), until done."""
    return await sweeps.sweep_all(connectors, sweeps.sweep_batch(task, now, **options))


async def _state(container: ContainerClient) -> list[tuple[str, str, str]]:
    """Each blob's and snapshot's name and etag: what a dry run must leave as it found it."""
    listing = container.list_blobs(include=["snapshots", "metadata", "tags"])
    return sorted([(i.name, str(i.etag), str(i.snapshot)) async for i in listing])


async def _changed(container: ContainerClient, name: str) -> datetime:
    return (await container.get_blob_client(name).get_blob_properties()).last_modified


@dataclasses.dataclass
class Backups:
    """Blobs taken a second apart: the old ones are due at `now`, the new ones are not."""

    locator: BlobBackupLocator
    ref_a: str
    ref_b: str
    old: dict[str, bytes]
    new: dict[str, bytes]
    outside: dict[str, bytes]
    now: datetime


async def _backups(container: ContainerClient) -> Backups:
    ref_a, ref_b = uuid.uuid4().hex, uuid.uuid4().hex
    locator = BlobBackupLocator(
        container=container.container_name,
        subject_tag="subject_ref",
        whole_backup_prefix="db/",
        categories=["user"],
    )
    old = {
        "db/2026-01-01.dump": b"everyone, January",
        "db/2026-02-01.dump": b"everyone, February",
        "exports/a-1.json": b'{"a": 1}',
        "exports/b-1.json": b'{"b": 1}',
    }
    new = {"db/2026-03-01.dump": b"everyone, March", "exports/a-2.json": b'{"a": 2}'}
    outside = {"notes/old.txt": b"not a backup", "untagged/x.json": b"{}"}
    tags = {"exports/a-1.json": ref_a, "exports/b-1.json": ref_b, "exports/a-2.json": ref_a}
    for name, content in {**old, **outside}.items():
        tag = {"subject_ref": tags[name]} if name in tags else None
        await container.upload_blob(name, content, tags=tag)
    snapshot_of = container.get_blob_client("db/2026-01-01.dump")
    await snapshot_of.create_snapshot()
    await asyncio.sleep(1.1)  # Last-Modified counts whole seconds
    for name, content in new.items():
        tag = {"subject_ref": tags[name]} if name in tags else None
        await container.upload_blob(name, content, tags=tag)
    latest_old = max([await _changed(container, name) for name in old])
    assert latest_old < min([await _changed(container, name) for name in new])
    now = latest_old + LIMIT + timedelta(milliseconds=500)
    return Backups(locator, ref_a, ref_b, old, new, outside, now)


# --- what is due goes, page by page ------------------------------------------------------------


async def test_due_backups_go_page_by_page_and_the_rest_stay_byte_identical(
    connectors: Connectors, container: ContainerClient
) -> None:
    b = await _backups(container)
    batch = sweeps.sweep_batch(_task(b.locator), b.now, batch_size=3)

    results = await sweeps.sweep_all(connectors, batch)

    assert len(results) == 3  # 8 blobs, 3 a page
    assert sum(r.removed for r in results) == len(b.old) == 4
    assert sum(r.held + r.undated for r in results) == 0
    assert await sweeps.contents(container) == {**b.new, **b.outside}
    snapshots = [i async for i in container.list_blobs(include=["snapshots"]) if i.snapshot]
    assert snapshots == []
    dated = [r for r in results if r.first is not None]
    assert dated
    for r in dated:
        assert r.first is not None and r.last is not None
        assert datetime.fromisoformat(r.first) <= datetime.fromisoformat(r.last)
    assert all(r.samples == [] for r in results)  # samples only in a dry run

    # A retried call (same cursor) finds nothing more due: nothing removed twice, nothing else.
    again = await sweeps.sweep_all(connectors, batch)
    assert sum(r.removed for r in again) == 0
    assert await sweeps.contents(container) == {**b.new, **b.outside}

    # A year on, the newer backups are due too; the blobs the locator does not cover stay.
    later = await _sweep(connectors, _task(b.locator), b.now + timedelta(days=365))
    assert [r.removed for r in later] == [2]
    assert await sweeps.contents(container) == b.outside


async def test_an_obligation_keeps_backups_past_their_limit(
    connectors: Connectors, container: ContainerClient
) -> None:
    b = await _backups(container)
    everything = {**b.old, **b.new, **b.outside}
    year_on = datetime.now(UTC) + timedelta(days=400)

    kept = await _sweep(
        connectors, _task(b.locator, obligations=[timedelta(days=6 * 365)]), year_on
    )
    assert sum(r.removed for r in kept) == 0
    assert await sweeps.contents(container) == everything

    # Once every obligation has ended, the limit decides.
    ended = await _sweep(
        connectors,
        _task(b.locator, obligations=[timedelta(days=6 * 365), timedelta(days=100)]),
        year_on,
    )
    assert sum(r.removed for r in ended) == 0  # the longest obligation still runs
    past = await _sweep(connectors, _task(b.locator, obligations=[timedelta(days=100)]), year_on)
    assert sum(r.removed for r in past) == len(b.old) + len(b.new)
    assert await sweeps.contents(container) == b.outside


async def test_dated_by_creation_time_or_by_last_change(
    connectors: Connectors, container: ContainerClient
) -> None:
    locator = BlobBackupLocator(
        container=container.container_name, whole_backup_prefix="db/", categories=["user"]
    )
    client = await container.upload_blob("db/full.dump", b"everyone")
    created = (await client.get_blob_properties()).creation_time
    await asyncio.sleep(1.1)
    await client.set_blob_metadata({"checked": "yes"})  # a change after creation
    assert await _changed(container, "db/full.dump") > created
    now = created + LIMIT + timedelta(milliseconds=500)

    by_change = await _sweep(connectors, _task(locator, dated="last_modified"), now)
    assert [r.removed for r in by_change] == [0]
    assert await sweeps.contents(container) == {"db/full.dump": b"everyone"}

    by_creation = await _sweep(connectors, _task(locator, dated="creation_time"), now)
    assert [r.removed for r in by_creation] == [1]
    assert by_creation[0].first == created.isoformat()
    assert await sweeps.contents(container) == {}


# --- holds ------------------------------------------------------------------------------------


async def test_a_subject_hold_keeps_their_blobs_and_every_whole_backup(
    connectors: Connectors, container: ContainerClient
) -> None:
    b = await _backups(container)
    hold = sweeps.hold("subject", b.ref_a)
    task = _task(b.locator)

    results = await _sweep(connectors, task, b.now, holds=[hold])

    # Only the other subject's due blob goes: a's is held, and whole backups hold a too.
    assert sum(r.removed for r in results) == 1
    assert sum(r.held for r in results) == 3
    assert "2 due whole backup(s) kept" in " ".join(r.detail for r in results)
    assert b.ref_a not in repr([r.model_dump() for r in results])
    left = await sweeps.contents(container)
    assert "exports/b-1.json" not in left
    assert left == {
        k: v for k, v in {**b.old, **b.new, **b.outside}.items() if k != "exports/b-1.json"
    }

    # Released, the hold keeps nothing.
    released = sweeps.hold("subject", b.ref_a, released=True)
    after = await _sweep(connectors, task, b.now, holds=[released])
    assert sum(r.removed for r in after) == 3
    assert sum(r.held for r in after) == 0
    assert await sweeps.contents(container) == {**b.new, **b.outside}


@pytest.mark.parametrize(("scope", "value"), [("tenant", "st-mary"), ("system", "backups")])
async def test_a_hold_on_the_whole_task_keeps_everything(
    connectors: Connectors, container: ContainerClient, scope: HoldScope, value: str
) -> None:
    b = await _backups(container)
    hold = sweeps.hold(scope, value)
    everything = {**b.old, **b.new, **b.outside}

    results = await _sweep(connectors, _task(b.locator), b.now, holds=[hold])

    assert sum(r.removed for r in results) == 0
    assert sum(r.held for r in results) == len(b.old)
    assert all(hold.id in r.detail for r in results)
    assert await sweeps.contents(container) == everything

    # Another tenant's hold does not bear on this system.
    other = await _sweep(connectors, _task(b.locator), b.now, holds=[sweeps.hold("tenant", "x")])
    assert sum(r.removed for r in other) == len(b.old)


# --- dry run ----------------------------------------------------------------------------------


async def test_a_dry_run_counts_and_touches_nothing(
    connectors: Connectors, container: ContainerClient
) -> None:
    b = await _backups(container)
    before = await _state(container)
    hold = sweeps.hold("subject", b.ref_b)

    results = await _sweep(connectors, _task(b.locator), b.now, dry_run=True, holds=[hold])

    # b's due blob is held, and so are the whole backups (they hold b too): a's would go.
    assert sum(r.removed for r in results) == 1
    assert sum(r.held for r in results) == 3
    # Samples: only whole backups' names, which name no subject; whole backups are kept while a
    # subject hold is active, so none here, and two without the hold.
    assert [s for r in results for s in r.samples] == []
    unheld = await _sweep(connectors, _task(b.locator), b.now, dry_run=True)
    assert sum(r.removed for r in unheld) == 4
    assert sorted(s for r in unheld for s in r.samples) == [
        "db/2026-01-01.dump",
        "db/2026-02-01.dump",
    ]
    after = await _state(container)
    assert after == before
    assert await sweeps.contents(container) == {**b.old, **b.new, **b.outside}


# --- a blob replaced meanwhile, and bad input ---------------------------------------------------


class _ReplacedMeanwhile(BackupSweep):
    """A writer replaces the first due blob between the listing and the deletions."""

    async def _delete(self, container: ContainerClient, due: list[_Due], counts: _Counts) -> None:
        await container.upload_blob(due[0].name, b"replaced", overwrite=True)
        await super()._delete(container, due, counts)


async def test_a_backup_replaced_after_listing_is_not_deleted(
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    locator = BlobBackupLocator(
        container=container.container_name, whole_backup_prefix="db/", categories=["user"]
    )
    for name in ("db/1.dump", "db/2.dump"):
        await container.upload_blob(name, b"everyone")
    now = datetime.now(UTC) + timedelta(days=400)
    service = clients.blob_service(blob_connection)

    result = await _ReplacedMeanwhile(
        service, "azurite", sweeps.sweep_batch(_task(locator), now)
    ).run()

    assert result.removed == 1
    assert result.done
    assert "1 due blob(s) changed since they were listed" in result.detail
    assert await sweeps.contents(container) == {"db/1.dump": b"replaced"}


async def test_a_missing_container_is_named_and_another_region_refused(
    connectors: Connectors, container: ContainerClient
) -> None:
    missing = BlobBackupLocator(
        container=sweeps.unique("missing-"), whole_backup_prefix="db/", categories=["user"]
    )
    batch = sweeps.sweep_batch(_task(missing), datetime.now(UTC))
    with pytest.raises(ApplicationError) as caught:
        await sweeps.sweep_once(connectors, batch)
    assert caught.value.type == "SchemaMismatch"
    assert caught.value.non_retryable
    assert missing.container in str(caught.value)

    await container.upload_blob("db/1.dump", b"everyone")
    here = BlobBackupLocator(
        container=container.container_name, whole_backup_prefix="db/", categories=["user"]
    )
    late = sweeps.sweep_batch(_task(here), datetime.now(UTC) + timedelta(days=400))
    with pytest.raises(ApplicationError) as caught:
        await sweeps.sweep_once(connectors, late, env=sweeps.region_env("us"))
    assert caught.value.type == "WrongRegion"
    assert await sweeps.contents(container) == {"db/1.dump": b"everyone"}


async def test_blobs_found_by_subject_prefix_are_swept_and_kept_by_any_subject_hold(
    connectors: Connectors, container: ContainerClient
) -> None:
    locator = BlobBackupLocator(
        container=container.container_name,
        subject_prefix="exports/{tenant}/{subject_id}/",
        categories=["user"],
    )
    await container.upload_blob("exports/st-mary/p-1/a.json", b"{}")
    await container.upload_blob("exports/st-mary/p-2/b.json", b"{}")
    await container.upload_blob("exports/readme.txt", b"not a subject's")
    task = _task(locator)
    now = datetime.now(UTC) + timedelta(days=400)

    held = await _sweep(connectors, task, now, holds=[sweeps.hold("subject", uuid.uuid4().hex)])
    assert (sum(r.removed for r in held), sum(r.held for r in held)) == (0, 2)
    assert "found by subject_prefix kept" in held[-1].detail
    dry = await _sweep(connectors, task, now, dry_run=True)
    assert [(r.removed, r.samples) for r in dry] == [(2, [])]  # their names hold subject ids

    swept = await _sweep(connectors, task, now)
    assert sum(r.removed for r in swept) == 2
    assert await sweeps.contents(container) == {"exports/readme.txt": b"not a subject's"}
