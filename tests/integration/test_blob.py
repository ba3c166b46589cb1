"""The backup connector against Azurite: per-subject blobs, whole backups and the erasure window,
whole backups left alone for a subject found nowhere, and the preflight that touches nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.storage.blob import (
    AccountSasPermissions,
    ResourceTypes,
    RetentionPolicy,
    generate_account_sas,
)
from azure.storage.blob.aio import BlobServiceClient, ContainerClient
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from lethe.activities import blob
from lethe.activities.blob import BackupEraser, BlobServiceError
from lethe.activities.clients import Clients
from lethe.activities.common import SchemaMismatch
from lethe.activities.connector import UnsupportedStep, erase_and_verify
from lethe.activities.connectors import Connectors
from lethe.classification.datamap import BlobBackupLocator
from lethe.contracts import Action, StepOutcome, StepRequest, Subject, VerifyRequest
from lethe.kernel.errors import ConfigurationError, ServiceUnavailable
from tests.steps import decision, step, step_request

CONNECTION_VARIABLE = "LETHE_STACK_BLOB_CONNECTION"


def _name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def _ref() -> str:
    return uuid.uuid4().hex


def _request(
    locator: BlobBackupLocator,
    subject: Subject,
    ref: str,
    *,
    action: Action = "delete",
    started: datetime | None = None,
    window_ends: datetime | None = None,
) -> StepRequest:
    reason = decision(
        action,
        rule="erasure-default" if action != "retain" else "hipaa-backup-retention",
        citation="GDPR Art. 17(1)" if action != "retain" else "45 CFR 164.316(b)(2)",
    )
    return step_request(
        step(locator, action=action, connection=CONNECTION_VARIABLE, decisions=[reason]),
        subject=subject,
        subject_ref=ref,
        request_id=uuid.uuid4().hex,
        started=started,
        window_ends=window_ends,
    )


@pytest.fixture
async def service(blob_connection: str) -> AsyncIterator[BlobServiceClient]:
    """The test's own client of Azurite."""
    async with BlobServiceClient.from_connection_string(blob_connection) as client:
        yield client


@pytest.fixture
async def container(service: BlobServiceClient) -> AsyncIterator[ContainerClient]:
    """A fresh container, removed after the test."""
    client = await service.create_container(_name("backups-"))
    try:
        yield client
    finally:
        await client.delete_container()


async def _names(container: ContainerClient, prefix: str | None = None) -> list[str]:
    return sorted([b.name async for b in container.list_blobs(name_starts_with=prefix)])


def _subjects() -> tuple[tuple[Subject, str], tuple[Subject, str]]:
    a = Subject(tenant="st-mary", subject_id=_name("patient-a-"))
    b = Subject(tenant="st-mary", subject_id=_name("patient-b-"))
    return (a, _ref()), (b, _ref())


async def test_tagged_and_prefixed_blobs_go_and_another_subjects_stay(
    clients: Clients, blob_connection: str, service: BlobServiceClient, container: ContainerClient
) -> None:
    (a, ref_a), (b, ref_b) = _subjects()
    locator = BlobBackupLocator(
        container=container.container_name,
        subject_tag="subject_ref",
        subject_prefix="exports/{subject_id}/",
        categories=["user"],
    )
    tagged_a = await container.upload_blob("tagged/a.json", b"{}", tags={"subject_ref": ref_a})
    await tagged_a.create_snapshot()
    await container.upload_blob("tagged/b.json", b"{}", tags={"subject_ref": ref_b})
    await container.upload_blob(f"exports/{a.subject_id}/1.json", b"{}")
    await container.upload_blob(f"exports/{a.subject_id}/2.json", b"{}")
    await container.upload_blob(f"exports/{b.subject_id}/1.json", b"{}")
    elsewhere = await service.create_container(_name("elsewhere-"))
    try:
        # The same tag in another container is outside the locator.
        await elsewhere.upload_blob("tagged/a.json", b"{}", tags={"subject_ref": ref_a})
        eraser = BackupEraser.open(clients, blob_connection)
        request = _request(locator, a, ref_a)

        erased = await eraser.erase(request)
        assert erased.status == "running"
        assert erased.affected == 3
        assert erased.evidence["subject_blobs_deleted"] == 3
        assert erased.evidence["held"] == 0
        assert a.subject_id not in repr(erased.model_dump())

        assert await _names(container) == [f"exports/{b.subject_id}/1.json", "tagged/b.json"]
        snapshots = [
            item.name
            async for item in container.list_blobs(include=["snapshots"])
            if item.snapshot is not None
        ]
        assert snapshots == []
        assert await _names(elsewhere) == ["tagged/a.json"]

        verified = await eraser.verify(request, erased)
        assert verified.status == "done"
        assert verified.verified
        assert verified.evidence["subject_blobs_remaining"] == 0
    finally:
        await elsewhere.delete_container()


async def test_erase_twice_and_concurrently_is_idempotent(
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    (a, ref_a), (_, ref_b) = _subjects()
    locator = BlobBackupLocator(
        container=container.container_name, subject_tag="subject_ref", categories=["user"]
    )
    for i in range(6):
        await container.upload_blob(f"a/{i}.json", b"{}", tags={"subject_ref": ref_a})
    await container.upload_blob("b/0.json", b"{}", tags={"subject_ref": ref_b})
    eraser = BackupEraser.open(clients, blob_connection)
    request = _request(locator, a, ref_a)

    # Two attempts racing (a retry after a lost heartbeat): one deletes, the other finds 404s.
    first, second = await asyncio.gather(eraser.erase(request), eraser.erase(request))
    assert {first.status, second.status} == {"running"}
    deleted = [int(o.evidence["subject_blobs_deleted"] or 0) for o in (first, second)]
    assert sum(deleted) == 6

    again = await eraser.erase(request)
    assert again.status == "running"
    assert again.affected == 0
    assert again.evidence["subject_blobs_deleted"] == 0
    assert await _names(container) == ["b/0.json"]
    assert (await eraser.verify(request, again)).status == "done"


class _WorkerLost(BaseException):
    """Stands for the end of the worker's process: nothing after it runs, nothing is caught."""


class _LostAfterDeleting(BackupEraser):
    """Loses its worker right after deleting the subject's blobs, before it can answer."""

    async def _delete_subject_blobs(self, *args: Any) -> Any:
        await super()._delete_subject_blobs(*args)
        raise _WorkerLost


@pytest.mark.parametrize("arrived", [True, False], ids=["plan arrived", "nothing arrived"])
async def test_a_retry_after_a_lost_worker_keeps_what_the_first_attempt_found(
    clients: Clients, blob_connection: str, container: ContainerClient, arrived: bool
) -> None:
    (a, ref_a), (_, ref_b) = _subjects()
    locator = BlobBackupLocator(
        container=container.container_name, subject_tag="subject_ref", categories=["user"]
    )
    for i in range(2):
        await container.upload_blob(f"a/{i}.json", b"{}", tags={"subject_ref": ref_a})
    await container.upload_blob("b/0.json", b"{}", tags={"subject_ref": ref_b})
    request = _request(locator, a, ref_a)
    beats: list[Any] = []
    first = ActivityEnvironment()
    first.info = dataclasses.replace(first.info, task_queue="lethe-eu")
    first.on_heartbeat = lambda *details: beats.extend(details)
    with pytest.raises(_WorkerLost):
        await first.run(_LostAfterDeleting.open(clients, blob_connection).erase, request)
    assert beats[0]["lethe_effect"]["planned"] == {"subject_blobs": 2, "whole_backups": 0}
    assert ref_a not in repr(beats)
    assert await _names(container) == ["b/0.json"]

    retry = ActivityEnvironment()
    retry.info = dataclasses.replace(
        first.info, attempt=2, heartbeat_details=beats[-1:] if arrived else []
    )
    outcome = await retry.run(
        erase_and_verify, BackupEraser.open(clients, blob_connection), request
    )
    assert outcome.status == "done", outcome.detail
    evidence = outcome.evidence
    # What the first attempt's deletions returned never arrived: not known, not made up.
    assert evidence["subject_blobs_deleted"] is None
    assert evidence["retry_subject_blobs_deleted"] == 0
    assert evidence["subject_blobs_remaining"] == 0
    if arrived:
        assert evidence["first_attempt_evidence"] == "planned"
        assert evidence["earlier_found_subject_blobs"] == 2
        assert evidence["whole_backups_deleted"] == 0  # its plan had none: none it deleted
        assert outcome.affected == 2
        assert "had found 2 subject blob(s)" in outcome.detail
    else:
        assert evidence["first_attempt_evidence"] == "lost"
        assert evidence["whole_backups_deleted"] is None
        assert outcome.affected == 0
        assert "no heartbeat of an earlier attempt arrived" in outcome.detail
    assert await _names(container) == ["b/0.json"]


async def test_whole_backups_past_the_window_go_and_later_ones_wait(
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    (a, ref_a), _ = _subjects()
    locator = BlobBackupLocator(
        container=container.container_name, whole_backup_prefix="db/", categories=["user"]
    )
    # Azurite stamps creation in whole seconds and cannot be back-dated, so the test spaces
    # the backups out and places the window's edge between them.
    await container.upload_blob("db/old.dump", b"old")
    await asyncio.sleep(2.2)
    await container.upload_blob("db/new.dump", b"new")
    await container.upload_blob("unrelated/old.dump", b"x")
    await asyncio.sleep(1.1)
    started = datetime.now(UTC)
    await asyncio.sleep(1.1)
    await container.upload_blob("db/after.dump", b"after")
    created = {b.name: b.creation_time async for b in container.list_blobs(name_starts_with="db/")}
    assert created["db/old.dump"] < created["db/new.dump"] <= started < created["db/after.dump"]

    edge = created["db/old.dump"] + (created["db/new.dump"] - created["db/old.dump"]) / 2
    window = datetime.now(UTC) - edge
    request = _request(locator, a, ref_a, started=started, window_ends=started + window)
    eraser = BackupEraser.open(clients, blob_connection)

    erased = await eraser.erase(request)
    assert erased.status == "running"
    assert erased.affected == 1
    assert erased.evidence["whole_backups_deleted"] == 1
    assert erased.evidence["whole_backups_inside_window"] == 1
    assert erased.evidence["whole_backups_after_erasure"] == 1
    due = created["db/new.dump"] + window
    assert erased.evidence["whole_backups_next_due_at"] == due.isoformat()
    assert erased.gone_by == due
    assert await _names(container) == ["db/after.dump", "db/new.dump", "unrelated/old.dump"]

    verified = await eraser.verify(request, erased)
    assert verified.status == "done"
    assert verified.evidence["remaining_inside_window"] == 1
    assert verified.evidence["whole_backups_past_window"] == 0
    assert verified.gone_by == due
    assert "inside the window" in verified.detail

    # The deferred phase runs again once the window has passed: everything taken before the
    # erasure goes, what was taken after it stays.
    await asyncio.sleep(max(0.0, (due - datetime.now(UTC)).total_seconds()) + 0.2)
    rerun = await eraser.erase(request)
    assert rerun.evidence["whole_backups_deleted"] == 1
    assert rerun.evidence["whole_backups_inside_window"] == 0
    assert rerun.gone_by is None
    final = await eraser.verify(request, rerun)
    assert final.status == "done"
    assert final.evidence["remaining_inside_window"] == 0
    assert final.gone_by is None
    assert await _names(container) == ["db/after.dump", "unrelated/old.dump"]


async def test_verify_fails_while_a_pre_erasure_backup_past_the_window_remains(
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    (a, ref_a), _ = _subjects()
    locator = BlobBackupLocator(
        container=container.container_name,
        subject_tag="subject_ref",
        whole_backup_prefix="db/",
        categories=["user"],
    )
    await container.upload_blob("db/full.dump", b"everyone")
    await container.upload_blob("exports/a.json", b"{}", tags={"subject_ref": ref_a})
    started = datetime.now(UTC) + timedelta(seconds=2)
    request = _request(locator, a, ref_a, started=started, window_ends=started)
    eraser = BackupEraser.open(clients, blob_connection)
    not_erased = StepOutcome(step_id=request.step.id, status="running")

    verified = await eraser.verify(request, not_erased)
    assert verified.status == "failed"
    assert verified.verified
    assert verified.evidence["subject_blobs_remaining"] == 1
    assert verified.evidence["whole_backups_past_window"] == 1
    assert "1 of the subject's blob(s) remain" in verified.detail


async def test_tag_queries_use_the_reference_never_the_raw_id(
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    locator = BlobBackupLocator(
        container=container.container_name,
        subject_tag="subject_ref",
        subject_prefix="exports/{subject_id}/",
        categories=["user"],
    )
    eraser = BackupEraser.open(clients, blob_connection)

    # Quotes in the subject id never reach the tag query, and the prefix is literal.
    quoted = Subject(tenant="st-mary", subject_id='o\'brien" or "subject_ref" > \'0')
    quoted_ref = _ref()
    await container.upload_blob("tagged/q.json", b"{}", tags={"subject_ref": quoted_ref})
    await container.upload_blob(f"exports/{quoted.subject_id}/1.json", b"{}")
    await container.upload_blob("exports/o/1.json", b"{}")
    await container.upload_blob("tagged/other.json", b"{}", tags={"subject_ref": _ref()})
    erased = await eraser.erase(_request(locator, quoted, quoted_ref))
    assert erased.affected == 2
    assert await _names(container) == ["exports/o/1.json", "tagged/other.json"]

    # A blob tagged with the raw id is not the subject's reference, so the query leaves it.
    plain = Subject(tenant="st-mary", subject_id=_name("patient-"))
    plain_ref = _ref()
    await container.upload_blob("tagged/raw.json", b"{}", tags={"subject_ref": plain.subject_id})
    await container.upload_blob("tagged/ref.json", b"{}", tags={"subject_ref": plain_ref})
    erased = await eraser.erase(_request(locator, plain, plain_ref))
    assert erased.affected == 1
    assert "tagged/raw.json" in await _names(container, "tagged/")
    assert "tagged/ref.json" not in await _names(container, "tagged/")

    # A reference that could break out of the query is refused before anything is touched.
    with pytest.raises(BlobServiceError, match="not a valid blob index tag value"):
        await eraser.erase(_request(locator, plain, "x' or 'a' = 'a"))
    assert await _names(container, "tagged/") == ["tagged/other.json", "tagged/raw.json"]


async def test_a_blob_the_service_will_not_delete_fails_the_step(
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    # Azurite answers 501 to legal holds and immutability policies; a lease is the refusal it
    # does implement, and takes the same path.
    (a, ref_a), _ = _subjects()
    locator = BlobBackupLocator(
        container=container.container_name, subject_tag="subject_ref", categories=["user"]
    )
    leased = await container.upload_blob("tagged/leased.json", b"{}", tags={"subject_ref": ref_a})
    await container.upload_blob("tagged/free.json", b"{}", tags={"subject_ref": ref_a})
    lease = await leased.acquire_lease(lease_duration=-1)
    eraser = BackupEraser.open(clients, blob_connection)
    request = _request(locator, a, ref_a)

    erased = await eraser.erase(request)
    assert erased.status == "failed"
    assert erased.affected == 1
    assert erased.evidence["held"] == 1
    assert "refused to delete 1 blob(s) under a lease another client holds" in erased.detail
    assert await _names(container) == ["tagged/leased.json"]
    verified = await eraser.verify(request, erased)
    assert verified.status == "failed"
    assert verified.evidence["subject_blobs_remaining"] == 1

    await lease.release()
    again = await eraser.erase(request)
    assert again.status == "running"
    assert (await eraser.verify(request, again)).status == "done"
    assert await _names(container) == []


async def test_a_prefix_ending_in_the_subject_id_is_refused(
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    # For subject 1, `exports/{subject_id}` would match subject 10's blobs too.
    one = Subject(tenant="st-mary", subject_id="1")
    locator = BlobBackupLocator(
        container=container.container_name,
        subject_prefix="exports/{subject_id}",
        categories=["user"],
    )
    await container.upload_blob("exports/1/a.json", b"{}")
    await container.upload_blob("exports/10/a.json", b"{}")
    with pytest.raises(ConfigurationError, match="ends with a placeholder"):
        await BackupEraser.open(clients, blob_connection).erase(_request(locator, one, _ref()))
    assert await _names(container) == ["exports/1/a.json", "exports/10/a.json"]


async def test_missing_container_is_a_schema_mismatch(
    clients: Clients, blob_connection: str
) -> None:
    (a, ref_a), _ = _subjects()
    missing = _name("missing-")
    locator = BlobBackupLocator(container=missing, subject_tag="subject_ref", categories=["user"])
    eraser = BackupEraser.open(clients, blob_connection)
    request = _request(locator, a, ref_a)
    with pytest.raises(SchemaMismatch, match=f"container '{missing}' does not exist"):
        await eraser.erase(request)
    with pytest.raises(SchemaMismatch):
        await eraser.verify(request, StepOutcome(step_id=request.step.id, status="running"))


async def test_a_retain_step_is_refused_and_touches_nothing(
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    (a, ref_a), _ = _subjects()
    locator = BlobBackupLocator(
        container=container.container_name, subject_tag="subject_ref", categories=["user"]
    )
    await container.upload_blob("tagged/a.json", b"{}", tags={"subject_ref": ref_a})
    eraser = BackupEraser.open(clients, blob_connection)
    request = _request(locator, a, ref_a, action="retain")
    # The regional workflow records retain steps itself: a connector given one refuses it.
    with pytest.raises(UnsupportedStep, match="kept by policy"):
        await eraser.erase(request)
    assert await _names(container) == ["tagged/a.json"]


async def test_soft_delete_is_reported_and_moves_gone_by(
    clients: Clients, blob_connection: str, service: BlobServiceClient, container: ContainerClient
) -> None:
    (a, ref_a), _ = _subjects()
    locator = BlobBackupLocator(
        container=container.container_name, subject_tag="subject_ref", categories=["user"]
    )
    await container.upload_blob("tagged/a.json", b"{}", tags={"subject_ref": ref_a})
    eraser = BackupEraser.open(clients, blob_connection)
    before = (await service.get_service_properties())["delete_retention_policy"]
    # An account-wide setting: restored at once, whatever happens.
    await service.set_service_properties(
        delete_retention_policy=RetentionPolicy(enabled=True, days=3)
    )
    try:
        erased = await eraser.erase(_request(locator, a, ref_a))
    finally:
        await service.set_service_properties(
            delete_retention_policy=RetentionPolicy(enabled=before.enabled, days=before.days)
        )
    assert erased.status == "running"
    assert erased.evidence["soft_delete_days"] == 3
    assert str(erased.evidence["soft_delete"]).startswith("on:")
    assert erased.gone_by is not None
    assert erased.gone_by > datetime.now(UTC) + timedelta(days=2, hours=23)
    assert "recoverable for 3 day(s)" in erased.detail
    # Azurite keeps no versions; the evidence says what was looked at, not that it was done.
    assert "none listed" in str(erased.evidence["versions"])


async def test_versions_and_soft_delete_evidence_without_deletions(
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    (a, ref_a), _ = _subjects()
    locator = BlobBackupLocator(
        container=container.container_name, subject_tag="subject_ref", categories=["user"]
    )
    outcome = await BackupEraser.open(clients, blob_connection).erase(_request(locator, a, ref_a))
    assert outcome.affected == 0
    assert outcome.evidence["soft_delete"] == "off: deleted blobs are not kept"
    assert outcome.evidence["versions"] == "nothing deleted, so no versions to look for"
    assert outcome.gone_by is None


async def test_unreachable_service_is_retryable_and_names_no_key(clients: Clients) -> None:
    (a, ref_a), _ = _subjects()
    connection = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        "AccountKey=c2VjcmV0LWtleS1zaG91bGQtbm90LWxlYWs=;"
        "BlobEndpoint=http://127.0.0.1:9/devstoreaccount1;"
    )
    locator = BlobBackupLocator(container="patient-exports", subject_tag="t", categories=["user"])
    with pytest.raises(ServiceUnavailable) as caught:
        await BackupEraser.open(clients, connection).erase(_request(locator, a, ref_a))
    assert "c2VjcmV0" not in str(caught.value)
    assert "127.0.0.1:9" in str(caught.value)


async def test_activities_check_the_region_and_type_errors(
    connectors: Connectors, blob_connection: str, container: ContainerClient
) -> None:
    (a, ref_a), _ = _subjects()
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, task_queue="lethe-eu")
    locator = BlobBackupLocator(
        container=container.container_name, subject_tag="subject_ref", categories=["user"]
    )
    await container.upload_blob("tagged/a.json", b"{}", tags={"subject_ref": ref_a})
    request = _request(locator, a, ref_a)
    erased = await env.run(connectors.activity("blob.erase"), request)
    assert erased.affected == 1
    verified = await env.run(
        connectors.activity("blob.verify"), VerifyRequest(request=request, erased=erased)
    )
    assert verified.status == "done"

    gone = locator.model_copy(update={"container": _name("missing-")})
    missing = request.model_copy(update={"step": request.step.model_copy(update={"locator": gone})})
    with pytest.raises(ApplicationError) as caught:
        await env.run(connectors.activity("blob.erase"), missing)
    assert caught.value.type == "SchemaMismatch"
    assert caught.value.non_retryable

    env.info = dataclasses.replace(env.info, task_queue="lethe-us")
    with pytest.raises(ApplicationError) as caught:
        await env.run(connectors.activity("blob.erase"), request)
    assert caught.value.type == "WrongRegion"


# --- whole backups only for a subject the erasure found ----------------------------------------


async def test_whole_backups_are_not_touched_when_the_subject_was_found_nowhere(
    connectors: Connectors, clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    (a, ref_a), _ = _subjects()
    locator = BlobBackupLocator(
        container=container.container_name,
        subject_tag="subject_ref",
        whole_backup_prefix="db/",
        categories=["user"],
    )
    await container.upload_blob("db/full.dump", b"everyone")
    await container.upload_blob("db/older.dump", b"everyone, earlier")
    await container.upload_blob("exports/a.json", b"{}", tags={"subject_ref": ref_a})
    await asyncio.sleep(1.1)
    # A window of nothing: every backup taken before the erasure is past it, due now.
    started = datetime.now(UTC)
    found = _request(locator, a, ref_a, started=started, window_ends=started)
    nowhere = found.model_copy(update={"subject_found": False})
    eraser = BackupEraser.open(clients, blob_connection)

    erased = await eraser.erase(nowhere)
    assert erased.status == "running"
    assert erased.affected == 1  # the subject's own blob still goes
    assert erased.evidence["subject_blobs_deleted"] == 1
    assert erased.evidence["whole_backups"] == blob.NOT_FOUND_NOTE
    assert erased.evidence["whole_backups"] == (
        "not touched: the subject was found in no system and is not on the forget-list"
    )
    assert erased.evidence["whole_backups_deleted"] == 0
    assert erased.evidence["whole_backups_inside_window"] is None  # not even counted
    assert erased.gone_by is None
    assert f"whole backups {blob.NOT_FOUND_NOTE}" in erased.detail
    assert await _names(container) == ["db/full.dump", "db/older.dump"]
    for name, content in (("db/full.dump", b"everyone"), ("db/older.dump", b"everyone, earlier")):
        assert await (await container.download_blob(name)).readall() == content

    verified = await eraser.verify(nowhere, erased)
    assert verified.status == "done", verified.detail
    assert verified.evidence["whole_backups"] == blob.NOT_FOUND_NOTE
    assert verified.evidence["whole_backups_past_window"] is None
    assert "whole backups not checked" in verified.detail
    assert "found in no system" in verified.detail

    # The activity, as the workflow runs it, says the same.
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, task_queue="lethe-eu")
    outcome = await env.run(connectors.activity("blob.erase"), nowhere)
    assert outcome.status == "done", outcome.detail
    assert outcome.evidence["whole_backups"] == blob.NOT_FOUND_NOTE
    assert await _names(container) == ["db/full.dump", "db/older.dump"]

    # Once the subject was found, today's rule holds: backups past the window go.
    again = await eraser.erase(found)
    assert again.evidence["whole_backups_deleted"] == 2
    assert again.evidence["whole_backups"] == blob.WHOLE_BACKUPS_DATED
    assert await _names(container) == []
    assert (await eraser.verify(found, again)).status == "done"


# --- preflight -------------------------------------------------------------------------------


async def _snapshot(container: ContainerClient) -> list[tuple[str, str, dict[str, str]]]:
    """Each blob's name, etag and tags (snapshots and metadata included in the etag listing):
    what a preflight must leave as it found it."""
    found = []
    async for item in container.list_blobs(include=["snapshots", "metadata", "tags"]):
        found.append((f"{item.name}@{item.snapshot}", str(item.etag), dict(item.tags or {})))
    return sorted(found)


def _with(connection: str, **fields: str) -> str:
    """The connection string with `fields` replaced (or added), and without the account key
    when a shared access signature is given."""
    parts = dict(part.split("=", 1) for part in connection.split(";") if "=" in part)
    parts.update(fields)
    if "SharedAccessSignature" in fields:
        parts.pop("AccountKey", None)
    return ";".join(f"{k}={v}" for k, v in parts.items())


def _account_sas(connection: str, expiry: datetime, **allowed: bool) -> str:
    parts = dict(part.split("=", 1) for part in connection.split(";") if "=" in part)
    return generate_account_sas(
        parts["AccountName"],
        parts["AccountKey"],
        ResourceTypes(container=True, object=True),
        AccountSasPermissions(**allowed),
        expiry=expiry,
    )


async def test_preflight_passes_for_a_good_locator_and_changes_nothing(
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    (a, ref_a), _ = _subjects()
    locator = BlobBackupLocator(
        container=container.container_name,
        subject_tag="subject_ref",
        subject_prefix="exports/{subject_id}/",
        whole_backup_prefix="db/",
        categories=["user"],
    )
    tagged = await container.upload_blob("tagged/a.json", b"{}", tags={"subject_ref": ref_a})
    await tagged.create_snapshot()
    await container.upload_blob(f"exports/{a.subject_id}/1.json", b"{}")
    await container.upload_blob("db/full.dump", b"everyone", metadata={"taken": "nightly"})
    before = await _snapshot(container)
    properties = await container.get_container_properties()
    eraser = BackupEraser.open(clients, blob_connection)

    assert await eraser.preflight(_request(locator, a, ref_a)) == []
    # Whatever the erasure found elsewhere: preflight only reads.
    nowhere = _request(locator, a, ref_a).model_copy(update={"subject_found": False})
    assert await eraser.preflight(nowhere) == []
    # A signature that allows what the step does is no problem either.
    sas = _account_sas(
        blob_connection,
        datetime.now(UTC) + timedelta(hours=1),
        read=True,
        list=True,
        delete=True,
        filter_by_tags=True,
    )
    signed = BackupEraser.open(clients, _with(blob_connection, SharedAccessSignature=sas))
    assert await signed.preflight(_request(locator, a, ref_a)) == []

    assert await _snapshot(container) == before
    assert (await container.get_container_properties()).etag == properties.etag


async def test_preflight_names_a_missing_container_identity_and_unsafe_prefix(
    clients: Clients, blob_connection: str, service: BlobServiceClient, container: ContainerClient
) -> None:
    missing = _name("missing-")
    subject = Subject(tenant="st-mary", subject_id="secret-subject-9")
    eraser = BackupEraser.open(clients, blob_connection)
    gone = BlobBackupLocator(container=missing, subject_tag="subject_ref", categories=["user"])

    assert await eraser.preflight(_request(gone, subject, _ref())) == [
        f"blob system 'backups': container '{missing}' does not exist"
    ]

    by_email = BlobBackupLocator(
        container=container.container_name,
        subject_prefix="exports/{identity.email}/",
        categories=["user"],
    )
    assert await eraser.preflight(_request(by_email, subject, _ref())) == [
        "blob system 'backups': subject_prefix: the template needs {identity.email}, which "
        "the request does not give"
    ]
    unsafe = by_email.model_copy(update={"subject_prefix": "exports/{subject_id}"})
    [problem] = await eraser.preflight(_request(unsafe, subject, _ref()))
    assert problem.startswith("blob system 'backups': subject_prefix: ")
    assert "ends with a placeholder" in problem
    tagged = BlobBackupLocator(
        container=container.container_name, subject_tag="subject_ref", categories=["user"]
    )
    assert await eraser.preflight(_request(tagged, subject, "x' or 'a' = 'a")) == [
        "blob system 'backups': the subject reference is not a valid blob index tag value, so "
        "subject_tag cannot find the subject's blobs"
    ]
    assert await _names(container) == []
    assert not await service.get_container_client(missing).exists()


async def test_preflight_says_what_the_credentials_do_not_allow(
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    (a, ref_a), _ = _subjects()
    locator = BlobBackupLocator(
        container=container.container_name,
        subject_tag="subject_ref",
        whole_backup_prefix="db/",
        categories=["user"],
    )
    await container.upload_blob("db/full.dump", b"everyone")
    before = await _snapshot(container)
    request = _request(locator, a, ref_a)
    where = "blob system 'backups'"
    in_container = f"container '{container.container_name}'"

    # A signature that may read, but neither list, delete nor find by tags.
    read_only = _account_sas(blob_connection, datetime.now(UTC) + timedelta(hours=1), read=True)
    problems = await BackupEraser.open(
        clients, _with(blob_connection, SharedAccessSignature=read_only)
    ).preflight(request)
    assert problems == [
        f"{where}: the connection's shared access signature does not allow list (l), "
        "delete (d), find by tags (f)",
        f"{where}: listing blobs in {in_container} was refused (HTTP 403 "
        "AuthorizationPermissionMismatch)",
        f"{where}: finding blobs by index tag in {in_container} was refused (HTTP 403 "
        "AuthorizationPermissionMismatch)",
    ]

    expired_at = (datetime.now(UTC) - timedelta(minutes=5)).replace(microsecond=0)
    expired = _account_sas(
        blob_connection, expired_at, read=True, list=True, delete=True, filter_by_tags=True
    )
    problems = await BackupEraser.open(
        clients, _with(blob_connection, SharedAccessSignature=expired)
    ).preflight(request)
    assert problems[0] == (
        f"{where}: the connection's shared access signature expired at {expired_at.isoformat()}"
    )
    assert problems[1].startswith(f"{where}: reading the properties of {in_container} was refused")

    wrong_key = "c2VjcmV0LWtleS1zaG91bGQtbm90LWxlYWs="
    [problem] = await BackupEraser.open(
        clients, _with(blob_connection, AccountKey=wrong_key)
    ).preflight(request)
    assert problem.startswith(f"{where}: ")
    assert "HTTP 403" in problem
    assert wrong_key not in problem
    assert await _snapshot(container) == before


async def test_preflight_of_an_unreachable_service_is_quick_and_transient(
    clients: Clients,
    connectors: Connectors,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (a, ref_a), _ = _subjects()
    connection = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        "AccountKey=c2VjcmV0LWtleS1zaG91bGQtbm90LWxlYWs=;"
        "BlobEndpoint=http://127.0.0.1:1/devstoreaccount1;"
    )
    locator = BlobBackupLocator(container="patient-exports", subject_tag="t", categories=["user"])
    request = _request(locator, a, ref_a)

    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as caught:
        await BackupEraser.open(clients, connection).preflight(request)
    assert time.monotonic() - started < blob.PREFLIGHT_TIMEOUT_SECONDS
    assert "127.0.0.1:1" in str(caught.value)
    assert "c2VjcmV0" not in str(caught.value)

    monkeypatch.setenv(CONNECTION_VARIABLE, connection)
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, task_queue="lethe-eu")
    check = await env.run(connectors.activity("blob.preflight"), request)
    assert check.transient
    assert check.problems == [f"ServiceUnavailable: {caught.value}"]
    retained = _request(locator, a, ref_a, action="retain")
    refused = await env.run(connectors.activity("blob.preflight"), retained)
    assert not refused.ready and not refused.transient
    assert refused.problems[0].startswith("UnsupportedStep: ")
