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

from lethe.activities.blob import PREFLIGHT_TIMEOUT_SECONDS
from lethe.activities.clients import Clients
from lethe.activities.common import SchemaMismatch
from lethe.activities.connector import UnsupportedStep, erase_and_verify
from lethe.activities.connectors import Connectors
from lethe.activities.logs import LogRedactor, _digest
from lethe.classification.datamap import LogLocator, MissingIdentity
from lethe.contracts import Action, StepOutcome, StepRequest, Subject
from lethe.kernel.errors import ServiceUnavailable
from tests.steps import decision, step, step_request

CONNECTION_VARIABLE = "LETHE_STACK_BLOB_CONNECTION"
FIELDS = {"patient_id": "subject_id", "email": "identity.email"}


def _name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def _request(
    locator: LogLocator, subject: Subject, *, action: Action = "delete", ref: str | None = None
) -> StepRequest:
    reason = decision(
        "delete" if action == "redact" else action,
        rule="logs-default",
        citation="GDPR Art. 17(1)" if action != "retain" else "GDPR Art. 17(3)(e)",
        exception="legal claims" if action == "retain" else None,
    )
    return step_request(
        step(locator, action=action, connection=CONNECTION_VARIABLE, decisions=[reason]),
        subject=subject,
        subject_ref=ref or uuid.uuid4().hex,
        request_id=uuid.uuid4().hex,
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
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    f = await _seed(container)
    untouched = await _etag(container, "portal/2.jsonl")
    redactor = LogRedactor.open(clients, blob_connection)
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

    # The rewritten blob says who rewrote it and how much; nothing of the subject's.
    props = await container.get_blob_client("portal/1.jsonl").get_blob_properties()
    assert props.metadata == {
        "lethe_request": request.request_id,
        "lethe_step": "app-logs/0",
        "lethe_records": "3",
    }

    # Run again, as after a crash: nothing rewritten, and the first run's work still reported.
    rewritten = await _etag(container, "portal/1.jsonl")
    again = await redactor.erase(request)
    assert again.affected == 3
    assert again.evidence["blobs_rewritten"] == 1
    assert again.evidence["first_attempt_evidence"] == "blob metadata"
    assert again.evidence["earlier_records_dropped"] == 3
    assert again.evidence["retry_records_dropped"] == 0
    assert await _etag(container, "portal/1.jsonl") == rewritten
    assert (await redactor.verify(request, again)).status == "done"


async def test_redact_replaces_the_subjects_fields_and_keeps_the_record(
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    f = await _seed(container)
    redactor = LogRedactor.open(clients, blob_connection)
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

    rewritten = await _etag(container, "portal/1.jsonl")
    again = await redactor.erase(request)
    assert again.affected == 3  # the first run's, by the blob's marks
    assert again.evidence["retry_records_redacted"] == 0
    assert await _etag(container, "portal/1.jsonl") == rewritten


async def test_verify_fails_while_records_remain(
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    f = await _seed(container)
    request = _request(f.locator, f.b)
    verified = await LogRedactor.open(clients, blob_connection).verify(
        request, StepOutcome(step_id=request.step.id, status="running")
    )
    assert verified.status == "failed"
    assert verified.evidence["records_matching"] == 3
    assert "3 log record(s) still carry" in verified.detail


async def test_a_concurrent_write_is_kept_not_lost(
    clients: Clients, blob_connection: str, container: ContainerClient
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

    erased = await RacingRedactor.open(clients, blob_connection).erase(_request(f.locator, f.a))
    assert erased.evidence["write_conflicts_retried"] == 1
    assert erased.affected == 3
    content = await _content(container, "portal/1.jsonl")
    assert content.endswith(late + b"\n")
    assert b'"1001"' not in content


class _WorkerLost(BaseException):
    """Stands for the end of the worker's process: nothing after it runs, nothing is caught."""


def _env(attempt: int = 1, heartbeat_details: list[Any] | None = None) -> ActivityEnvironment:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        env.info, task_queue="lethe-eu", attempt=attempt, heartbeat_details=heartbeat_details or []
    )
    return env


class _LostAfterFirstBlob(LogRedactor):
    """Loses its worker right after rewriting the first blob, before anything else runs."""

    async def _erase_blob(self, blob: BlobClient, *args: Any) -> None:
        await super()._erase_blob(blob, *args)
        raise _WorkerLost


async def _two_blobs_of_a(container: ContainerClient) -> Fixture:
    f = await _seed(container)
    await container.upload_blob(
        "portal/2.jsonl", _line(ts="t10", patient_id="1001") + b"\n", overwrite=True
    )
    return f


async def test_a_retry_resumes_after_the_last_blob_an_earlier_attempt_heartbeated(
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    f = await _two_blobs_of_a(container)
    request = _request(f.locator, f.a)
    first = _env()
    beats: list[Any] = []
    first.on_heartbeat = lambda *details: beats.append(details[0])
    with pytest.raises(_WorkerLost):
        await first.run(_LostAfterFirstBlob.open(clients, blob_connection).erase, request)
    assert beats == []  # the worker was lost before the heartbeat after the first blob
    # Say the heartbeat after the first blob did arrive: the retry resumes after that blob.
    beats = [
        {
            "lethe_effect": {"request": request.request_id, "step": "app-logs/0", "attempt": 1},
            "progress": {"last_done": _digest("portal/1.jsonl"), "affected": 3, "scanned": 1,
                         "rewritten": 1, "unparsed": 2},
        }
    ]  # fmt: skip
    rewritten = await _etag(container, "portal/1.jsonl")

    retry = _env(attempt=2, heartbeat_details=beats)
    retried: list[Any] = []
    retry.on_heartbeat = lambda *details: retried.append(details[0])
    erased = await retry.run(LogRedactor.open(clients, blob_connection).erase, request)

    assert erased.evidence["resumed_from_blob"] == 1
    assert erased.affected == 4  # 3 from the earlier attempt, 1 now
    assert erased.evidence["blobs_scanned"] == 2
    assert erased.evidence["blobs_rewritten"] == 2
    assert erased.evidence["first_attempt_evidence"] == "recorded"
    assert erased.evidence["earlier_records_dropped"] == 3
    assert erased.evidence["retry_records_dropped"] == 1
    assert await _etag(container, "portal/1.jsonl") == rewritten  # not read, not rewritten
    assert retried[-1]["progress"]["last_done"] == _digest("portal/2.jsonl")
    assert "portal/" not in repr(retried)  # blob names (they may say whose a log is) stay out
    assert b"1001" not in await _content(container, "portal/2.jsonl")


async def test_a_retry_without_heartbeats_finds_the_earlier_rewrite_by_its_marks(
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    f = await _two_blobs_of_a(container)
    request = _request(f.locator, f.a)
    with pytest.raises(_WorkerLost):
        await _env().run(_LostAfterFirstBlob.open(clients, blob_connection).erase, request)
    rewritten = await _etag(container, "portal/1.jsonl")

    erased = await _env(attempt=2).run(LogRedactor.open(clients, blob_connection).erase, request)

    assert erased.evidence["resumed_from_blob"] == 0
    assert erased.affected == 4
    assert erased.evidence["records_dropped"] == 4
    assert erased.evidence["blobs_rewritten"] == 2
    assert erased.evidence["first_attempt_evidence"] == "blob metadata"
    assert erased.evidence["earlier_blobs_rewritten"] == 1
    assert erased.evidence["earlier_records_dropped"] == 3
    assert erased.evidence["retry_records_dropped"] == 1
    assert await _etag(container, "portal/1.jsonl") == rewritten  # the effect was made once
    kept = [f.mixed[i] for i in (1, 2, 4, 6, 7)]
    assert await _content(container, "portal/1.jsonl") == b"\n".join(kept) + b"\n"


async def test_a_retry_whose_last_blob_is_gone_reads_every_blob_again(
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    f = await _two_blobs_of_a(container)
    request = _request(f.locator, f.a)
    with pytest.raises(_WorkerLost):
        await _env().run(_LostAfterFirstBlob.open(clients, blob_connection).erase, request)
    gone = {
        "lethe_effect": {"request": request.request_id, "step": "app-logs/0", "attempt": 1},
        "progress": {"last_done": _digest("portal/0-rotated-away.jsonl"), "affected": 9},
    }
    erased = await _env(attempt=2, heartbeat_details=[gone]).run(
        LogRedactor.open(clients, blob_connection).erase, request
    )
    assert erased.evidence["resumed_from_blob"] == 0
    assert erased.affected == 4  # by the marks and this attempt, not the lost blob's 9
    assert erased.evidence["first_attempt_evidence"] == "blob metadata"


async def test_a_retry_after_a_worker_lost_while_verifying_keeps_the_erase_counts(
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    f = await _two_blobs_of_a(container)
    request = _request(f.locator, f.a)

    class LostWhileVerifying(LogRedactor):
        async def verify(self, request: StepRequest, erased: StepOutcome) -> StepOutcome:
            await super().verify(request, erased)
            raise _WorkerLost

    first = _env()
    beats: list[Any] = []
    first.on_heartbeat = lambda *details: beats.append(details[0])
    with pytest.raises(_WorkerLost):
        await first.run(
            erase_and_verify, LostWhileVerifying.open(clients, blob_connection), request
        )

    outcome = await _env(attempt=2, heartbeat_details=beats[-1:]).run(
        erase_and_verify, LogRedactor.open(clients, blob_connection), request
    )
    assert outcome.status == "done", outcome.detail
    assert outcome.affected == 4
    assert outcome.evidence["resumed_from_blob"] == 2  # nothing left to read again
    assert outcome.evidence["first_attempt_evidence"] == "recorded"
    assert outcome.evidence["retry_records_dropped"] == 0


async def test_a_tenant_field_leaves_another_tenants_subject_with_the_same_id(
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    lines = [
        _line(ts="t1", tenant="st-mary", patient_id="1001", email="ada@example.org", msg="a"),
        _line(ts="t2", tenant="st-luke", patient_id="1001", email="ada@example.org", msg="b"),
        b'{"ts": "t3",  "tenant": "st-luke", "patient_id": 1001, "msg": "spaced oddly"}',
        _line(ts="t4", tenant="st-mary", patient_id=1001, msg="numeric id"),
        _line(ts="t5", tenant="st-luke", email="ada@example.org", msg="by email"),
        _line(ts="t6", tenant="st-mary", email="ada@example.org", msg="by email"),
        b"plain text, not JSON",
        _line(ts="t7", tenant="st-luke", patient_id="1002", msg="someone else"),
    ]
    await container.upload_blob("portal/1.jsonl", b"\n".join(lines) + b"\n")
    locator = LogLocator(
        container=container.container_name,
        prefix="portal/",
        fields=FIELDS,
        tenant_field="tenant",
        categories=["user.unique_id"],
    )
    mary = Subject(tenant="st-mary", subject_id="1001", identities={"email": "ada@example.org"})
    luke = mary.model_copy(update={"tenant": "st-luke"})
    redactor = LogRedactor.open(clients, blob_connection)
    request = _request(locator, mary, action="redact")
    assert await redactor.preflight(request) == []

    erased = await redactor.erase(request)
    assert erased.affected == 3
    assert erased.evidence["records_redacted"] == 3
    assert erased.evidence["records_without_tenant"] == 0
    after = (await _content(container, "portal/1.jsonl")).split(b"\n")
    for i in (1, 2, 4, 6, 7):
        assert after[i] == lines[i]  # the other tenant's lines, byte for byte
    assert [json.loads(after[i])["patient_id"] for i in (0, 3)] == ["[redacted]"] * 2
    assert json.loads(after[5])["email"] == "[redacted]"
    assert json.loads(after[0])["tenant"] == "st-mary"  # the tenant field is not personal data

    verified = await redactor.verify(request, erased)
    assert verified.status == "done", verified.detail
    assert verified.evidence["records_redacted_present"] == 3
    assert verified.evidence["records_without_tenant"] == 0
    # The other tenant's subject is still there for their own erasure, and only theirs.
    theirs = _request(locator, luke)
    pending = await redactor.verify(theirs, StepOutcome(step_id="app-logs/0", status="running"))
    assert pending.evidence["records_matching"] == 3
    assert pending.evidence["records_redacted_present"] == 0
    dropped = await redactor.erase(theirs)
    assert dropped.affected == 3
    kept = (await _content(container, "portal/1.jsonl")).split(b"\n")
    assert kept == [after[0], after[3], after[5], lines[6], lines[7], b""]


async def test_records_with_the_subjects_values_and_no_tenant_are_left_and_fail_verify(
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    lines = [
        _line(ts="t1", tenant="st-mary", patient_id="1001", msg="ours"),
        _line(ts="t2", patient_id="1001", msg="no tenant: whose?"),
        _line(ts="t3", tenant=None, patient_id="1001", msg="null tenant"),
    ]
    await container.upload_blob("portal/1.jsonl", b"\n".join(lines))
    locator = LogLocator(
        container=container.container_name,
        prefix="portal/",
        fields=FIELDS,
        tenant_field="tenant",
        categories=["user.unique_id"],
    )
    request = _request(locator, Subject(tenant="st-mary", subject_id="1001"))
    redactor = LogRedactor.open(clients, blob_connection)

    erased = await redactor.erase(request)
    assert erased.affected == 1
    assert erased.evidence["records_without_tenant"] == 2
    assert await _content(container, "portal/1.jsonl") == b"\n".join(lines[1:])
    verified = await redactor.verify(request, erased)
    assert verified.status == "failed"
    assert verified.evidence["records_matching"] == 0
    assert verified.evidence["records_without_tenant"] == 2
    assert "2 log record(s) carry the subject's values but no tenant in 'tenant'" in (
        verified.detail
    )
    assert "1001" not in verified.detail


async def test_preflight_names_a_tenant_field_the_logs_do_not_carry(
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    f = await _seed(container)  # records without any tenant field
    before = await _snapshot(container)
    redactor = LogRedactor.open(clients, blob_connection)
    scoped = f.locator.model_copy(update={"tenant_field": "tenant"})

    problems = await redactor.preflight(_request(scoped, f.a))
    assert problems == [
        "logs system 'app-logs': none of the first 6 record(s) of the first log blob under "
        f"prefix 'portal/' in container '{container.container_name}' has the tenant_field "
        "'tenant', so an erasure would find none of the subject's records (is the field named "
        "right?)"
    ]
    assert "1001" not in repr(problems)
    # An empty prefix has nothing to sample: no problem.
    empty = scoped.model_copy(update={"prefix": "nothing-here/"})
    assert await redactor.preflight(_request(empty, f.a)) == []
    assert await _snapshot(container) == before


async def test_append_blobs_with_the_subject_fail_clearly(
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    f = await _seed(container)
    append = container.get_blob_client("portal/3.jsonl")
    await append.create_append_blob()
    await append.append_block(_line(patient_id="1001") + b"\n")
    before = await _content(container, "portal/3.jsonl")
    erased = await LogRedactor.open(clients, blob_connection).erase(_request(f.locator, f.a))
    assert erased.status == "failed"
    assert erased.evidence["blobs_not_rewritable"] == 1
    assert "append or page blob" in erased.detail
    assert await _content(container, "portal/3.jsonl") == before
    assert erased.evidence["blobs_rewritten"] == 1  # the block blob was still done


async def test_a_blob_that_is_not_json_lines_is_reported_unchecked(
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    f = await _seed(container)
    await container.upload_blob("portal/old.jsonl.gz", gzip.compress(_line(patient_id="1001")))
    redactor = LogRedactor.open(clients, blob_connection)
    request = _request(f.locator, f.a)
    erased = await redactor.erase(request)
    assert erased.evidence["blobs_without_json"] == 1
    verified = await redactor.verify(request, erased)
    assert verified.status == "failed"
    assert verified.evidence["records_matching"] == 0
    assert "1 blob(s) under the prefix hold no JSON lines" in verified.detail


async def test_missing_identities_are_named(
    clients: Clients, blob_connection: str, container: ContainerClient
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
        await LogRedactor.open(clients, blob_connection).erase(_request(by_email, no_email))

    # With patient_id available, the email mapping is skipped, not an error.
    erased = await LogRedactor.open(clients, blob_connection).erase(_request(f.locator, no_email))
    assert erased.affected == 2  # t1 and t5; t3 carries only the email


async def test_missing_container_retain_and_unsupported_action_are_refused(
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    f = await _seed(container)
    redactor = LogRedactor.open(clients, blob_connection)
    missing = f.locator.model_copy(update={"container": _name("missing-")})
    with pytest.raises(SchemaMismatch, match="does not exist"):
        await redactor.erase(_request(missing, f.a))
    with pytest.raises(SchemaMismatch):
        await redactor.verify(
            _request(missing, f.a), StepOutcome(step_id="app-logs/0", status="running")
        )

    # The regional workflow records retain steps itself: a connector given one refuses it.
    with pytest.raises(UnsupportedStep, match="kept by policy"):
        await redactor.erase(_request(f.locator, f.a, action="retain"))
    with pytest.raises(UnsupportedStep, match="logs cannot 'tombstone'"):
        await redactor.erase(_request(f.locator, f.a, action="tombstone"))
    assert await _content(container, "portal/1.jsonl") == b"\n".join(f.mixed) + b"\n"


async def test_evidence_holds_no_personal_data(
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    f = await _seed(container)
    redactor = LogRedactor.open(clients, blob_connection)
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
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    f = await _seed(container)
    before = await _snapshot(container)
    redactor = LogRedactor.open(clients, blob_connection)

    for action in ("delete", "redact", "anonymize"):
        assert await redactor.preflight(_request(f.locator, f.a, action=action)) == [], action
    # One value to find records by is enough, as for erase.
    no_email = Subject(tenant="st-mary", subject_id="1001")
    assert await redactor.preflight(_request(f.locator, no_email)) == []

    assert await _snapshot(container) == before


async def test_preflight_names_a_missing_container_identity_and_action(
    clients: Clients, blob_connection: str, container: ContainerClient
) -> None:
    f = await _seed(container)
    before = await _snapshot(container)
    redactor = LogRedactor.open(clients, blob_connection)
    missing = f.locator.model_copy(update={"container": _name("missing-")})

    assert await redactor.preflight(_request(missing, f.a)) == [
        f"logs system 'app-logs': container '{missing.container}' does not exist"
    ]
    by_email = f.locator.model_copy(update={"fields": {"email": "identity.email"}})
    no_email = Subject(tenant="st-mary", subject_id="1001")
    with pytest.raises(
        UnsupportedStep,
        match="logs system 'app-logs': logs cannot 'tombstone'; use delete, redact, purge, "
        "anonymize",
    ):
        await redactor.preflight(_request(by_email, no_email, action="tombstone"))
    problems = await redactor.preflight(_request(by_email, no_email))
    assert problems == [
        f"logs system 'app-logs': the log locator in container '{container.container_name}' "
        "finds records by identity.email; the request gives none of them",
    ]
    assert "1001" not in repr(problems)
    assert await _snapshot(container) == before


async def test_preflight_says_what_a_signature_does_not_allow(
    clients: Clients, blob_connection: str, container: ContainerClient
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

    assert await LogRedactor.open(clients, signed).preflight(_request(f.locator, f.a)) == [
        "logs system 'app-logs': the connection's shared access signature does not allow write (w)"
    ]
    assert await _snapshot(container) == before


async def test_preflight_of_an_unreachable_service_is_quick_and_transient(
    clients: Clients,
    connectors: Connectors,
    container: ContainerClient,
    monkeypatch: pytest.MonkeyPatch,
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
        await LogRedactor.open(clients, connection).preflight(request)
    assert time.monotonic() - started < PREFLIGHT_TIMEOUT_SECONDS
    assert "127.0.0.1:1" in str(caught.value)
    assert "c2VjcmV0" not in str(caught.value)

    monkeypatch.setenv(CONNECTION_VARIABLE, connection)
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, task_queue="lethe-eu")
    check = await env.run(connectors.activity("logs.preflight"), request)
    assert check.transient
    assert check.problems == [f"ServiceUnavailable: {caught.value}"]
