"""The log connector against Azurite: drop or redact one subject's JSON-lines records only, and
the preflight that touches nothing."""

from __future__ import annotations

import dataclasses
import gzip
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.storage.blob import (
    AccountSasPermissions,
    BlobProperties,
    ResourceTypes,
    generate_account_sas,
)
from azure.storage.blob.aio import BlobClient, BlobServiceClient, ContainerClient
from temporalio.testing import ActivityEnvironment

from activities import logs
from activities.blob import PREFLIGHT_TIMEOUT_SECONDS
from activities.common import SchemaMismatch
from activities.logs import LogRedactor
from classification.datamap import LogLocator, MissingIdentity
from lethe.contracts import (
    Action,
    Decision,
    Step,
    StepOutcome,
    StepRequest,
    Subject,
    VerifyRequest,
)
from lethe.errors import ConfigurationError, ServiceUnavailable

CONNECTION_VARIABLE = "LETHE_STACK_BLOB_CONNECTION"
FIELDS = {"patient_id": "subject_id", "email": "identity.email"}


def _name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def _request(
    locator: LogLocator, subject: Subject, *, action: Action = "delete", ref: str | None = None
) -> StepRequest:
    started = datetime.now(UTC)
    return StepRequest(
        request_id=uuid.uuid4().hex,
        subject_ref=ref or uuid.uuid4().hex,
        subject=subject,
        step=Step(
            id="app-logs/0",
            system="app-logs",
            kind="logs",
            region="eu",
            connection=CONNECTION_VARIABLE,
            locator=locator,
            action=action,
            phase="deferred",
            decisions=[
                Decision(
                    rule="logs-default",
                    strategy="delete" if action == "redact" else action,
                    citation="GDPR Art. 17(1)" if action != "retain" else "GDPR Art. 17(3)(e)",
                    exception="legal claims" if action == "retain" else None,
                )
            ],
        ),
        erasure_started_at=started,
        window_ends_at=started + timedelta(days=30),
    )


def _line(**record: Any) -> bytes:
    return json.dumps(record).encode()


@pytest.fixture
async def container(blob_connection: str) -> AsyncIterator[ContainerClient]:
    """A fresh container, removed after the test."""
    async with BlobServiceClient.from_connection_string(blob_connection) as service:
        client = await service.create_container(_name("app-logs-"))
        try:
            yield client
        finally:
            await client.delete_container()


@dataclasses.dataclass
class Fixture:
    """Two subjects' records in three log blobs, two of them under the locator's prefix."""

    locator: LogLocator
    a: Subject
    b: Subject
    mixed: list[bytes]
    """The lines of portal/1.jsonl."""


async def _seed(container: ContainerClient) -> Fixture:
    a = Subject(tenant="st-mary", subject_id="1001", identities={"email": "ada@example.org"})
    b = Subject(tenant="st-mary", subject_id="1002", identities={"email": "bo@example.org"})
    mixed = [
        _line(ts="t1", patient_id="1001", email="ada@example.org", msg="login"),
        _line(ts="t2", patient_id="1002", email="bo@example.org", msg="login"),
        b"plain text, not JSON: worker started",
        _line(ts="t3", email="ada@example.org", msg="password reset"),  # found by email alone
        b'{"ts": "t4",   "patient_id": "1002",  "msg": "spaced oddly"}\r',
        _line(ts="t5", patient_id=1001, msg="numeric id"),  # found as the number 1001
        b"[1, 2, 3]",
        _line(ts="t6", patient_id="10011", msg="a longer id is someone else"),
    ]
    await container.upload_blob("portal/1.jsonl", b"\n".join(mixed) + b"\n")
    await container.upload_blob(
        "portal/2.jsonl", _line(ts="t7", patient_id="1002", msg="only b") + b"\n"
    )
    await container.upload_blob("other/1.jsonl", _line(ts="t8", patient_id="1001") + b"\n")
    locator = LogLocator(
        container=container.container_name,
        prefix="portal/",
        fields=FIELDS,
        categories=["user.unique_id"],
    )
    return Fixture(locator, a, b, mixed)


async def _content(container: ContainerClient, name: str) -> bytes:
    return await (await container.download_blob(name)).readall()


async def _etag(container: ContainerClient, name: str) -> str:
    return str((await container.get_blob_client(name).get_blob_properties()).etag)


async def test_delete_drops_only_the_subjects_records(
    blob_connection: str, container: ContainerClient
) -> None:
    f = await _seed(container)
    untouched = await _etag(container, "portal/2.jsonl")
    redactor = LogRedactor.for_connection(blob_connection)
    request = _request(f.locator, f.a)

    erased = await redactor.erase(request)
    assert erased.status == "running"
    assert erased.affected == 3
    assert erased.evidence == {
        "action": "delete",
        "blobs_scanned": 2,
        "blobs_rewritten": 1,
        "records_dropped": 3,
        "unparsed_lines": 2,
        "write_conflicts_retried": 0,
        "blobs_not_rewritable": 0,
        "blobs_without_json": 0,
        "resumed_from_blob": 0,
    }
    kept = [f.mixed[i] for i in (1, 2, 4, 6, 7)]
    assert await _content(container, "portal/1.jsonl") == b"\n".join(kept) + b"\n"
    assert await _etag(container, "portal/2.jsonl") == untouched
    assert b"1001" in await _content(container, "other/1.jsonl")  # outside the prefix

    verified = await redactor.verify(request, erased)
    assert verified.status == "done"
    assert verified.verified
    assert verified.evidence["records_matching"] == 0

    # Run again, as after a crash: nothing left to do, and nothing rewritten.
    rewritten = await _etag(container, "portal/1.jsonl")
    again = await redactor.erase(request)
    assert again.affected == 0
    assert again.evidence["blobs_rewritten"] == 0
    assert await _etag(container, "portal/1.jsonl") == rewritten
    assert (await redactor.verify(request, again)).status == "done"


async def test_redact_replaces_the_subjects_fields_and_keeps_the_record(
    blob_connection: str, container: ContainerClient
) -> None:
    f = await _seed(container)
    redactor = LogRedactor.for_connection(blob_connection)
    request = _request(f.locator, f.a, action="redact")

    erased = await redactor.erase(request)
    assert erased.affected == 3
    assert erased.evidence["records_redacted"] == 3
    lines = (await _content(container, "portal/1.jsonl")).split(b"\n")
    assert len(lines) == len(f.mixed) + 1
    for i in (1, 2, 4, 6, 7):
        assert lines[i] == f.mixed[i]  # byte for byte
    assert json.loads(lines[0]) == {
        "ts": "t1",
        "patient_id": "[redacted]",
        "email": "[redacted]",
        "msg": "login",
    }
    assert json.loads(lines[3]) == {"ts": "t3", "email": "[redacted]", "msg": "password reset"}
    assert json.loads(lines[5]) == {"ts": "t5", "patient_id": "[redacted]", "msg": "numeric id"}

    verified = await redactor.verify(request, erased)
    assert verified.status == "done"
    assert verified.evidence["records_redacted_present"] == 3

    again = await redactor.erase(request)
    assert again.affected == 0
    assert again.evidence["blobs_rewritten"] == 0


async def test_verify_fails_while_records_remain(
    blob_connection: str, container: ContainerClient
) -> None:
    f = await _seed(container)
    request = _request(f.locator, f.b)
    verified = await LogRedactor.for_connection(blob_connection).verify(
        request, StepOutcome(step_id=request.step.id, status="running")
    )
    assert verified.status == "failed"
    assert verified.evidence["records_matching"] == 3
    assert "3 log record(s) still carry" in verified.detail


async def test_a_concurrent_write_is_kept_not_lost(
    blob_connection: str, container: ContainerClient
) -> None:
    f = await _seed(container)
    late = _line(ts="t9", patient_id="1002", msg="written while Lethe was rewriting")

    class RacingRedactor(LogRedactor):
        """Appends a line behind the redactor's back right after its first read."""

        raced = False

        async def _read(self, blob: BlobClient) -> tuple[bytes, str, BlobProperties] | None:
            read = await super()._read(blob)
            if read is not None and not self.raced and blob.blob_name == "portal/1.jsonl":
                self.raced = True
                await blob.upload_blob(read[0] + late + b"\n", overwrite=True)
            return read

    erased = await RacingRedactor(blob_connection).erase(_request(f.locator, f.a))
    assert erased.evidence["write_conflicts_retried"] == 1
    assert erased.affected == 3
    content = await _content(container, "portal/1.jsonl")
    assert content.endswith(late + b"\n")
    assert b'"1001"' not in content


async def test_resumes_after_the_last_blob_an_earlier_attempt_finished(
    blob_connection: str, container: ContainerClient
) -> None:
    f = await _seed(container)
    await container.upload_blob(
        "portal/2.jsonl", _line(ts="t10", patient_id="1001") + b"\n", overwrite=True
    )
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        env.info,
        task_queue="lethe-eu",
        heartbeat_details=[{"last_done": 0, "affected": 3, "scanned": 1, "rewritten": 1}],
    )
    beats: list[Any] = []
    env.on_heartbeat = lambda *details: beats.append(details[0])

    erased = await env.run(logs.erase, _request(f.locator, f.a))
    assert erased.evidence["resumed_from_blob"] == 1
    assert erased.affected == 4  # 3 from the earlier attempt, 1 now
    assert erased.evidence["blobs_scanned"] == 2
    # (the activity verifies after erasing; the erase phase's heartbeats carry `last_done`)
    assert [beat for beat in beats if "last_done" in beat][-1]["last_done"] == 1
    # The blob the earlier attempt "finished" is skipped, so its records are still there.
    assert await _content(container, "portal/1.jsonl") == b"\n".join(f.mixed) + b"\n"
    assert b"1001" not in await _content(container, "portal/2.jsonl")

    request = _request(f.locator, f.a)
    verified = await env.run(logs.verify, VerifyRequest(request=request, erased=erased))
    assert verified.status == "failed"


async def test_append_blobs_with_the_subject_fail_clearly(
    blob_connection: str, container: ContainerClient
) -> None:
    f = await _seed(container)
    append = container.get_blob_client("portal/3.jsonl")
    await append.create_append_blob()
    await append.append_block(_line(patient_id="1001") + b"\n")
    before = await _content(container, "portal/3.jsonl")
    erased = await LogRedactor.for_connection(blob_connection).erase(_request(f.locator, f.a))
    assert erased.status == "failed"
    assert erased.evidence["blobs_not_rewritable"] == 1
    assert "append or page blob" in erased.detail
    assert await _content(container, "portal/3.jsonl") == before
    assert erased.evidence["blobs_rewritten"] == 1  # the block blob was still done


async def test_a_blob_that_is_not_json_lines_is_reported_unchecked(
    blob_connection: str, container: ContainerClient
) -> None:
    f = await _seed(container)
    await container.upload_blob("portal/old.jsonl.gz", gzip.compress(_line(patient_id="1001")))
    redactor = LogRedactor.for_connection(blob_connection)
    request = _request(f.locator, f.a)
    erased = await redactor.erase(request)
    assert erased.evidence["blobs_without_json"] == 1
    verified = await redactor.verify(request, erased)
    assert verified.status == "failed"
    assert verified.evidence["records_matching"] == 0
    assert "1 blob(s) under the prefix hold no JSON lines" in verified.detail


async def test_missing_identities_are_named(
    blob_connection: str, container: ContainerClient
) -> None:
    f = await _seed(container)
    by_email = LogLocator(
        container=container.container_name,
        prefix="portal/",
        fields={"email": "identity.email"},
        categories=["user.contact.email"],
    )
    no_email = Subject(tenant="st-mary", subject_id="1001")
    with pytest.raises(MissingIdentity, match=r"identity\.email"):
        await LogRedactor.for_connection(blob_connection).erase(_request(by_email, no_email))

    # With patient_id available, the email mapping is skipped, not an error.
    erased = await LogRedactor.for_connection(blob_connection).erase(_request(f.locator, no_email))
    assert erased.affected == 2  # t1 and t5; t3 carries only the email


async def test_missing_container_retain_and_unsupported_action(
    blob_connection: str, container: ContainerClient
) -> None:
    f = await _seed(container)
    redactor = LogRedactor.for_connection(blob_connection)
    missing = f.locator.model_copy(update={"container": _name("missing-")})
    with pytest.raises(SchemaMismatch, match="does not exist"):
        await redactor.erase(_request(missing, f.a))
    with pytest.raises(SchemaMismatch):
        await redactor.verify(
            _request(missing, f.a), StepOutcome(step_id="app-logs/0", status="running")
        )

    retained = await redactor.erase(_request(f.locator, f.a, action="retain"))
    assert retained.status == "retained"
    assert "GDPR Art. 17(3)(e) (legal claims)" in retained.detail

    with pytest.raises(ConfigurationError, match="logs cannot 'tombstone'"):
        await redactor.erase(_request(f.locator, f.a, action="tombstone"))
    assert await _content(container, "portal/1.jsonl") == b"\n".join(f.mixed) + b"\n"


async def test_evidence_holds_no_personal_data(
    blob_connection: str, container: ContainerClient
) -> None:
    f = await _seed(container)
    redactor = LogRedactor.for_connection(blob_connection)
    request = _request(f.locator, f.a, action="redact")
    erased = await redactor.erase(request)
    verified = await redactor.verify(request, erased)
    shown = repr(erased.model_dump()) + repr(verified.model_dump())
    assert "ada@example.org" not in shown
    assert "1001" not in shown


# --- preflight -------------------------------------------------------------------------------


async def _snapshot(container: ContainerClient) -> list[tuple[str, str, bytes]]:
    """Each blob's name, etag and content: what a preflight must leave as it found it."""
    return sorted(
        [
            (item.name, str(item.etag), await _content(container, item.name))
            async for item in container.list_blobs()
        ]
    )


async def test_preflight_passes_for_a_good_locator_and_changes_nothing(
    blob_connection: str, container: ContainerClient
) -> None:
    f = await _seed(container)
    before = await _snapshot(container)
    redactor = LogRedactor.for_connection(blob_connection)

    for action in ("delete", "redact", "anonymize"):
        assert await redactor.preflight(_request(f.locator, f.a, action=action)) == [], action
    # One value to find records by is enough, as for erase.
    no_email = Subject(tenant="st-mary", subject_id="1001")
    assert await redactor.preflight(_request(f.locator, no_email)) == []

    assert await _snapshot(container) == before


async def test_preflight_names_a_missing_container_identity_and_action(
    blob_connection: str, container: ContainerClient
) -> None:
    f = await _seed(container)
    before = await _snapshot(container)
    redactor = LogRedactor.for_connection(blob_connection)
    missing = f.locator.model_copy(update={"container": _name("missing-")})

    assert await redactor.preflight(_request(missing, f.a)) == [
        f"logs system 'app-logs': container '{missing.container}' does not exist"
    ]
    by_email = f.locator.model_copy(update={"fields": {"email": "identity.email"}})
    no_email = Subject(tenant="st-mary", subject_id="1001")
    problems = await redactor.preflight(_request(by_email, no_email, action="tombstone"))
    assert problems == [
        "logs system 'app-logs': logs cannot 'tombstone'; use delete, redact, anonymize or retain",
        f"logs system 'app-logs': the log locator in container '{container.container_name}' "
        "finds records by identity.email; the request gives none of them",
    ]
    assert "1001" not in repr(problems)
    assert await redactor.preflight(_request(missing, f.a, action="retain")) == []
    assert await _snapshot(container) == before


async def test_preflight_says_what_a_signature_does_not_allow(
    blob_connection: str, container: ContainerClient
) -> None:
    f = await _seed(container)
    before = await _snapshot(container)
    parts = dict(part.split("=", 1) for part in blob_connection.split(";") if "=" in part)
    sas = generate_account_sas(
        parts["AccountName"],
        parts["AccountKey"],
        ResourceTypes(container=True, object=True),
        AccountSasPermissions(read=True, list=True),
        expiry=datetime.now(UTC) + timedelta(hours=1),
    )
    signed = f"BlobEndpoint={parts['BlobEndpoint']};SharedAccessSignature={sas}"

    assert await LogRedactor(signed).preflight(_request(f.locator, f.a)) == [
        "logs system 'app-logs': the connection's shared access signature does not allow write (w)"
    ]
    assert await _snapshot(container) == before


async def test_preflight_of_an_unreachable_service_is_quick_and_transient(
    container: ContainerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = await _seed(container)
    connection = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        "AccountKey=c2VjcmV0LWtleS1zaG91bGQtbm90LWxlYWs=;"
        "BlobEndpoint=http://127.0.0.1:1/devstoreaccount1;"
    )
    request = _request(f.locator, f.a)

    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as caught:
        await LogRedactor(connection).preflight(request)
    assert time.monotonic() - started < PREFLIGHT_TIMEOUT_SECONDS
    assert "127.0.0.1:1" in str(caught.value)
    assert "c2VjcmV0" not in str(caught.value)

    monkeypatch.setenv(CONNECTION_VARIABLE, connection)
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, task_queue="lethe-eu")
    check = await env.run(logs.preflight, request)
    assert check.transient
    assert check.problems == [f"ServiceUnavailable: {caught.value}"]
