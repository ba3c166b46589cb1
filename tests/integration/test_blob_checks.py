"""The blob and logs connectors' preflight keeps a container check that passed, against Azurite.

Requests to the service are counted on the test's own client (the SDK's `raw_request_hook`), so
a kept answer is seen to cost no call; the TTL is the test's to set.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from azure.storage.blob.aio import BlobServiceClient, ContainerClient

from lethe.activities.blob import BackupEraser
from lethe.activities.blob_checks import ContainerChecks
from lethe.activities.clients import Clients
from lethe.activities.common import SchemaMismatch
from lethe.activities.logs import LogRedactor
from lethe.classification.datamap import BlobBackupLocator, LogLocator
from lethe.contracts import StepRequest, Subject
from tests.steps import decision, step, step_request

CONNECTION_VARIABLE = "LETHE_STACK_BLOB_CONNECTION"
LONG_TTL = 600.0


def _name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def _request(locator: BlobBackupLocator | LogLocator, subject_id: str | None = None) -> StepRequest:
    return step_request(
        step(
            locator, action="delete", connection=CONNECTION_VARIABLE, decisions=[decision("delete")]
        ),
        subject=Subject(tenant="st-mary", subject_id=subject_id or _name("patient-")),
        subject_ref=uuid.uuid4().hex,
        request_id=uuid.uuid4().hex,
    )


@dataclass
class Counted:
    """The test's own client of Azurite, counting the requests it sends."""

    service: BlobServiceClient
    connection: str
    requests: list[str] = field(default_factory=list)

    def eraser(self, checks: ContainerChecks) -> BackupEraser:
        """A backup connector over this client, keeping its checks in `checks`."""
        return BackupEraser(self.service, self.connection, checks)

    def redactor(self, checks: ContainerChecks) -> LogRedactor:
        """A log connector over this client, keeping its checks in `checks`."""
        return LogRedactor(self.service, self.connection, checks)


@pytest.fixture
async def counted(blob_connection: str) -> AsyncIterator[Counted]:
    """A client whose every request is counted (method and path, no query)."""
    requests: list[str] = []

    def hook(pipeline_request: Any) -> None:
        http = pipeline_request.http_request
        requests.append(f"{http.method} {http.url.split('?')[0]}")

    async with BlobServiceClient.from_connection_string(
        blob_connection, raw_request_hook=hook
    ) as service:
        yield Counted(service, blob_connection, requests)


@pytest.fixture
async def container(blob_connection: str) -> AsyncIterator[ContainerClient]:
    """A fresh container, removed after the test (if the test has not removed it)."""
    async with BlobServiceClient.from_connection_string(blob_connection) as service:
        client = await service.create_container(_name("checks-"))
        try:
            yield client
        finally:
            if await client.exists():
                await client.delete_container()


def _backups(container: str) -> BlobBackupLocator:
    return BlobBackupLocator(
        container=container,
        subject_tag="subject_ref",
        subject_prefix="exports/{subject_id}/",
        whole_backup_prefix="db/",
        categories=["user"],
    )


def _logs(container: str, tenant_field: str | None = None) -> LogLocator:
    return LogLocator(
        container=container,
        prefix="portal/",
        fields={"patient_id": "subject_id"},
        tenant_field=tenant_field,
        categories=["user.unique_id"],
    )


async def test_a_check_that_passed_is_reused_for_other_subjects(
    counted: Counted, container: ContainerClient
) -> None:
    await container.upload_blob("db/full.dump", b"everyone")
    checks = ContainerChecks(ttl_seconds=LONG_TTL)
    eraser = counted.eraser(checks)
    locator = _backups(container.container_name)

    assert await eraser.preflight(_request(locator)) == []
    # Properties, a listing under each prefix and a look-up by tag.
    assert len(counted.requests) == 4
    assert checks.reads == 1
    for _ in range(5):
        assert await eraser.preflight(_request(locator)) == []
    assert len(counted.requests) == 4
    assert checks.reads == 1

    # Another locator of the same container is another check.
    whole_only = locator.model_copy(update={"subject_tag": None, "subject_prefix": None})
    assert await eraser.preflight(_request(whole_only)) == []
    assert len(counted.requests) == 6
    assert checks.reads == 2

    # What the request itself must give is checked every time, the container or not.
    by_email = locator.model_copy(update={"subject_prefix": "exports/{identity.email}/"})
    assert await eraser.preflight(_request(by_email)) == [
        "blob system 'backups': subject_prefix: the template needs {identity.email}, which "
        "the request does not give"
    ]


async def test_the_logs_container_and_tenant_field_checks_are_reused(
    counted: Counted, container: ContainerClient
) -> None:
    record = {"tenant": "st-mary", "patient_id": "1001"}
    await container.upload_blob("portal/1.jsonl", json.dumps(record).encode() + b"\n")
    checks = ContainerChecks(ttl_seconds=LONG_TTL)
    redactor = counted.redactor(checks)
    locator = _logs(container.container_name, tenant_field="tenant")

    assert await redactor.preflight(_request(locator)) == []
    first = len(counted.requests)
    assert first == 4  # properties, a listing; then a listing and a range read for the sample
    assert checks.reads == 2
    for _ in range(5):
        assert await redactor.preflight(_request(locator)) == []
    assert len(counted.requests) == first
    assert checks.reads == 2


async def test_preflights_at_once_share_one_check(
    counted: Counted, container: ContainerClient
) -> None:
    checks = ContainerChecks(ttl_seconds=LONG_TTL)
    eraser = counted.eraser(checks)
    locator = _backups(container.container_name)

    found = await asyncio.gather(*(eraser.preflight(_request(locator)) for _ in range(20)))

    assert found == [[]] * 20
    assert checks.reads == 1
    assert len(counted.requests) == 4


async def test_a_container_deleted_after_a_check_passed_is_reported_once_the_ttl_passes(
    counted: Counted, container: ContainerClient
) -> None:
    checks = ContainerChecks(ttl_seconds=0.5)
    redactor = counted.redactor(checks)
    locator = _logs(container.container_name)
    name = container.container_name
    assert await redactor.preflight(_request(locator)) == []

    await container.delete_container()
    # Within the TTL the kept answer stands (and costs no request) ...
    before = len(counted.requests)
    assert await redactor.preflight(_request(locator)) == []
    assert len(counted.requests) == before
    await asyncio.sleep(0.6)
    # ... after it the service is asked again, and the problem is reported.
    missing = [f"logs system 'app-logs': container '{name}' does not exist"]
    assert await redactor.preflight(_request(locator)) == missing
    assert len(counted.requests) > before


async def test_an_erase_that_finds_the_container_gone_drops_the_kept_check(
    counted: Counted, container: ContainerClient
) -> None:
    checks = ContainerChecks(ttl_seconds=LONG_TTL)
    eraser = counted.eraser(checks)
    locator = _backups(container.container_name)
    assert await eraser.preflight(_request(locator)) == []

    await container.delete_container()
    with pytest.raises(SchemaMismatch, match="does not exist"):
        await eraser.erase(_request(locator))

    assert await eraser.preflight(_request(locator)) == [
        f"blob system 'backups': container '{container.container_name}' does not exist"
    ]


async def test_a_problem_is_never_kept(
    counted: Counted, blob_connection: str, container: ContainerClient
) -> None:
    checks = ContainerChecks(ttl_seconds=LONG_TTL)
    eraser = counted.eraser(checks)
    name = _name("later-")
    locator = _backups(name)
    missing = [f"blob system 'backups': container '{name}' does not exist"]

    assert await eraser.preflight(_request(locator)) == missing
    asked = len(counted.requests)
    assert await eraser.preflight(_request(locator)) == missing
    assert len(counted.requests) == asked * 2  # asked again, not kept
    assert checks.reads == 2

    async with BlobServiceClient.from_connection_string(blob_connection) as service:
        created = await service.create_container(name)
        try:
            # Created now: the very next preflight sees it, whatever the TTL.
            assert await eraser.preflight(_request(locator)) == []
        finally:
            await created.delete_container()


async def test_a_tenant_field_problem_is_never_kept(
    counted: Counted, container: ContainerClient
) -> None:
    checks = ContainerChecks(ttl_seconds=LONG_TTL)
    redactor = counted.redactor(checks)
    locator = _logs(container.container_name, tenant_field="tenant")
    await container.upload_blob("portal/1.jsonl", b'{"patient_id": "1001"}\n')

    [problem] = await redactor.preflight(_request(locator, "1001"))
    assert "has the tenant_field 'tenant'" in problem
    assert "1001" not in problem
    asked = len(counted.requests)
    assert await redactor.preflight(_request(locator, "1001")) == [problem]
    assert len(counted.requests) > asked  # the sample read again
    await container.upload_blob(
        "portal/1.jsonl", b'{"tenant": "st-mary", "patient_id": "1001"}\n', overwrite=True
    )
    assert await redactor.preflight(_request(locator, "1001")) == []


async def test_a_worker_keeps_one_set_of_checks_per_connection(
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    checks = clients.blob_checks(blob_connection)
    assert clients.blob_checks(blob_connection) is checks
    assert clients.blob_checks(blob_connection + "x=y;") is not checks
    eraser = BackupEraser.open(clients, blob_connection)
    redactor = LogRedactor.open(clients, blob_connection)
    reads = checks.reads

    assert await eraser.preflight(_request(_backups(container.container_name))) == []
    assert await eraser.preflight(_request(_backups(container.container_name))) == []
    assert await redactor.preflight(_request(_logs(container.container_name))) == []
    assert await redactor.preflight(_request(_logs(container.container_name))) == []
    assert checks.reads == reads + 2  # one for each kind's check, shared by both connectors
