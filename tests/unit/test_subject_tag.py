"""`lethe.kernel.subjects.tag_for` is the index-tag value the backup connector looks for."""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import cast

import pytest
from azure.storage.blob.aio import ContainerClient
from temporalio.client import Client as TemporalClient

from lethe.activities import blob
from lethe.activities.blob import BackupEraser
from lethe.activities.clients import Clients
from lethe.classification.datamap import BlobBackupLocator
from lethe.contracts import StepRequest, Subject
from lethe.kernel.config import Settings
from lethe.kernel.errors import ConfigurationError
from lethe.kernel.subjects import subject_ref, tag_for
from lethe.sdk.client import Client
from tests.steps import decision, step, step_request

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
TENANT = "st-mary"
PATIENT = "p-1"
TAG = "subject_ref"
_QUERY = re.compile(r"^\"(?P<name>[^\"]+)\" = '(?P<value>[^']*)'$")


@dataclass(frozen=True)
class _Found:
    name: str


@dataclass
class _Container:
    """Blobs and their index tags, answering `find_blobs_by_tags` for a one-tag query as Azure
    does (the connector asks nothing more of it here)."""

    tags: dict[str, dict[str, str]] = field(default_factory=dict)
    queries: list[str] = field(default_factory=list)

    def upload(self, name: str, tags: dict[str, str]) -> None:
        self.tags[name] = tags

    async def find_blobs_by_tags(self, query: str) -> AsyncIterator[_Found]:
        self.queries.append(query)
        match = _QUERY.fullmatch(query)
        assert match is not None, query
        for name, tags in self.tags.items():
            if tags.get(match["name"]) == match["value"]:
                yield _Found(name)


def _request(ref: str) -> tuple[StepRequest, BlobBackupLocator]:
    locator = BlobBackupLocator(
        container="patient-exports", subject_tag=TAG, categories=["user.contact"]
    )
    request = step_request(
        step(
            locator,
            connection="BACKUPS_BLOB",
            decisions=[decision("delete", citation="GDPR Art. 17")],
        ),
        subject=Subject(tenant=TENANT, subject_id=PATIENT),
        subject_ref=ref,
        started=datetime(2026, 11, 2, tzinfo=UTC),
    )
    return request, locator


def _control_plane_ref(key: bytes) -> str:
    """The reference an erasure carries: what `Client.erase` computes for the subject."""
    settings = Settings(subject_key=base64.b64encode(key).decode())
    return Client(cast(TemporalClient, None), settings).subject_ref(TENANT, PATIENT)


def test_tag_for_is_the_reference_an_erasure_carries() -> None:
    assert (
        tag_for(TENANT, PATIENT, KEY)
        == _control_plane_ref(KEY)
        == subject_ref(TENANT, PATIENT, KEY)
    )
    assert blob._TAG_VALUE.fullmatch(tag_for(TENANT, PATIENT, KEY))


async def test_the_backup_connector_finds_the_blob_a_service_tagged_with_tag_for() -> None:
    container = _Container()
    container.upload("exports/ada.json", {TAG: tag_for(TENANT, PATIENT, KEY)})
    container.upload("exports/grace.json", {TAG: tag_for(TENANT, "p-2", KEY)})
    container.upload("exports/stale.json", {TAG: tag_for(TENANT, PATIENT, OTHER_KEY)})
    request, locator = _request(_control_plane_ref(KEY))
    async with Clients() as clients:
        eraser = BackupEraser.open(
            clients, "AccountName=a;AccountKey=k;BlobEndpoint=http://127.0.0.1:9/a"
        )
        found = await eraser._subject_blobs(cast(ContainerClient, container), request, locator)
    assert found == ["exports/ada.json"]
    assert container.queries == [f"\"{TAG}\" = '{tag_for(TENANT, PATIENT, KEY)}'"]


def test_the_key_defaults_to_lethe_subject_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LETHE_SUBJECT_KEY", base64.b64encode(KEY).decode())
    assert tag_for(TENANT, PATIENT) == tag_for(TENANT, PATIENT, KEY)
    monkeypatch.setenv("LETHE_SUBJECT_KEY", base64.b64encode(OTHER_KEY).decode())
    assert tag_for(TENANT, PATIENT) == tag_for(TENANT, PATIENT, OTHER_KEY)


def test_without_a_subject_key_it_says_which_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LETHE_SUBJECT_KEY", raising=False)
    with pytest.raises(ConfigurationError, match="LETHE_SUBJECT_KEY is not set"):
        tag_for(TENANT, PATIENT)
