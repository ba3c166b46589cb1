"""The log connector's batches against Azurite: a hundred and more subjects' records dropped or
redacted with each log blob read once and written once for the whole batch, per-subject counts,
everyone else's lines byte for byte, marks a retry reads per batch, one journal per batch, and a
second call that writes nothing."""

from __future__ import annotations

import dataclasses
import json
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.storage.blob import BlobProperties
from azure.storage.blob.aio import BlobClient, BlobServiceClient, ContainerClient
from temporalio.testing import ActivityEnvironment

from lethe.activities import logs
from lethe.activities.clients import Clients
from lethe.activities.connectors import Connectors
from lethe.activities.logs import LogRedactor
from lethe.classification.datamap import LogLocator
from lethe.contracts import Action, BatchStepOutcome, BatchStepRequest, BulkSubject, Subject
from tests.steps import decision, step

CONNECTION_VARIABLE = "LETHE_STACK_BLOB_CONNECTION"
FIELDS = {"patient_id": "subject_id", "email": "identity.email"}
SUBJECTS = 120
"""Subjects in the batch under test."""
OTHERS = 40
"""Subjects outside the batch whose records share the log blobs."""
BLOBS = 6
"""Log blobs under the prefix holding records of the batch (one more holds only others')."""


def _name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def container(blob_connection: str) -> AsyncIterator[ContainerClient]:
    """A fresh container, removed after the test."""
    async with BlobServiceClient.from_connection_string(blob_connection) as service:
        client = await service.create_container(_name("batch-logs-"))
        try:
            yield client
        finally:
            await client.delete_container()


def _person(tenant: str, n: int) -> BulkSubject:
    return BulkSubject(
        subject_ref=uuid.uuid4().hex,
        subject=Subject(
            tenant=tenant, subject_id=f"p-{n}", identities={"email": f"p{n}@example.org"}
        ),
    )


@dataclasses.dataclass
class Seeded:
    """The batch, the log blobs' lines, and which lines are whose."""

    locator: LogLocator
    subjects: list[BulkSubject]
    blobs: dict[str, list[bytes]]
    """Log blob -> its lines (the last one empty: blobs end with a newline)."""
    owners: dict[str, list[set[int]]]
    """Log blob -> for each line, the batch's subjects (positions) it is a record of."""
    etags: dict[str, str]

    def expected(self) -> list[int]:
        counts = [0] * len(self.subjects)
        for owners in self.owners.values():
            for whose in owners:
                for index in whose:
                    counts[index] += 1
        return counts

    def holding(self) -> set[str]:
        """The blobs that hold a record of the batch."""
        return {name for name, owners in self.owners.items() if any(owners)}


def _record(rng: random.Random, who: Subject, tenant: str | None, ts: int) -> bytes:
    n = who.subject_id.split("-")[1]
    record: dict[str, Any] = {"ts": f"t{ts}", "msg": rng.choice(["login", "view", "logout"])}
    if tenant is not None:
        record["tenant"] = tenant
    shape = rng.randrange(3)
    if shape != 1:
        record["patient_id"] = who.subject_id
    if shape != 0:
        record["email"] = f"p{n}@example.org"
    return json.dumps(record).encode()


async def _seed(container: ContainerClient, *, tenants: bool = False) -> Seeded:
    """BLOBS log blobs of records of the batch's subjects and others (with `tenants`, the batch
    spans two tenants, and a third tenant has subjects with the batch's very ids), plain-text
    lines, a record of two of the batch's subjects at once, a blob of others only, and a blob
    outside the prefix."""
    rng = random.Random(12)
    homes = ["st-mary", "st-luke"] if tenants else ["st-mary"]
    batch = [_person(homes[n % len(homes)], n) for n in range(SUBJECTS)]
    others = [_person("st-mary", SUBJECTS + n) for n in range(OTHERS)]
    # With tenants: the batch's own ids and emails in a tenant of no subject of the batch.
    twins = [_person("st-john", n) for n in range(0, SUBJECTS, 7)] if tenants else []
    field = "tenant" if tenants else None
    blobs: dict[str, list[bytes]] = {}
    owners: dict[str, list[set[int]]] = {}
    ts = 0
    for b in range(BLOBS + 1):
        lines: list[bytes] = []
        whose: list[set[int]] = []
        people = others + twins if b == BLOBS else batch + others + twins
        for _ in range(150):
            ts += 1
            who = rng.choice(people)
            tenant = who.subject.tenant if tenants else None
            lines.append(_record(rng, who.subject, tenant, ts))
            whose.append({batch.index(who)} if who in batch else set())
            if ts % 37 == 0:
                lines.append(b"plain text, not JSON: worker restarted")
                whose.append(set())
        if b == 0:  # one record carries two of the batch's subjects: both lose it
            two = {"ts": "both", "patient_id": "p-0", "email": "p2@example.org"}
            if tenants:
                two["tenant"] = "st-mary"
            lines.append(json.dumps(two).encode())
            whose.append({0, 2})
        lines.append(b"")
        whose.append(set())
        name = f"portal/{b}.jsonl"
        blobs[name], owners[name] = lines, whose
        await container.upload_blob(name, b"\n".join(lines))
    outside = _record(rng, batch[1].subject, batch[1].subject.tenant if tenants else None, 0)
    await container.upload_blob("archive/1.jsonl", outside + b"\n")
    locator = LogLocator(
        container=container.container_name,
        prefix="portal/",
        fields=FIELDS,
        tenant_field=field,
        categories=["user.unique_id"],
    )
    etags = {b.name: str(b.etag) async for b in container.list_blobs()}
    return Seeded(locator, batch, blobs, owners, etags)


def _batch(seeded: Seeded, action: Action = "delete", number: int = 4) -> BatchStepRequest:
    reason = decision("delete" if action == "redact" else action, rule="logs-default")
    started = datetime.now(UTC)
    return BatchStepRequest(
        request_id=uuid.uuid4().hex,
        batch=number,
        step=step(
            seeded.locator, action=action, connection=CONNECTION_VARIABLE, decisions=[reason]
        ),
        subjects=seeded.subjects,
        erasure_started_at=started,
        window_ends_at=started + timedelta(days=30),
    )


class Counting(LogRedactor):
    """Counts each blob's reads by the erase (verify reads by itself) and its writes."""

    reads: Counter[str]
    writes: Counter[str]

    async def _read(self, blob: BlobClient) -> tuple[bytes, str, BlobProperties] | None:
        self.reads[blob.blob_name] += 1
        return await super()._read(blob)


@pytest.fixture
def counted(clients: Clients, blob_connection: str, monkeypatch: pytest.MonkeyPatch) -> Counting:
    """A redactor whose reads and writes of log blobs are counted (the real calls, counted)."""
    redactor = Counting.open(clients, blob_connection)
    redactor.reads, redactor.writes = Counter(), Counter()
    swap = logs.swap_blob

    async def counted_swap(blob: BlobClient, *args: Any) -> None:
        redactor.writes[blob.blob_name] += 1
        await swap(blob, *args)

    monkeypatch.setattr(logs, "swap_blob", counted_swap)
    return redactor


async def _lines(container: ContainerClient, name: str) -> list[bytes]:
    return (await (await container.download_blob(name)).readall()).split(b"\n")


async def _etags(container: ContainerClient) -> dict[str, str]:
    return {b.name: str(b.etag) async for b in container.list_blobs()}


async def test_a_batch_drops_its_records_reading_and_writing_each_blob_once(
    container: ContainerClient, counted: Counting
) -> None:
    seeded = await _seed(container)
    batch = _batch(seeded)
    assert LogRedactor.batching and LogRedactor.describe().batching == LogRedactor.batching

    outcome = await counted.erase_batch(batch)

    holding = seeded.holding()
    assert len(holding) == BLOBS
    assert counted.reads == Counter({name: 1 for name in seeded.blobs})
    assert counted.writes == Counter({name: 1 for name in holding})  # once per batch
    assert [o.subject_ref for o in outcome.outcomes] == [s.subject_ref for s in seeded.subjects]
    assert {o.status for o in outcome.outcomes} == {"done"}, outcome.outcomes[:3]
    expected = seeded.expected()
    assert [o.affected for o in outcome.outcomes] == expected
    assert outcome.affected == sum(expected)  # the subjects' counts
    # The record of two subjects counts for each of them, and once in the batch's.
    assert outcome.evidence["records_dropped"] == sum(expected) - 1
    assert outcome.evidence["blobs_rewritten"] == BLOBS
    assert outcome.evidence["records_matching"] == 0
    assert outcome.evidence["subjects"] == SUBJECTS
    for name, lines in seeded.blobs.items():
        kept = [line for line, whose in zip(lines, seeded.owners[name], strict=True) if not whose]
        assert await _lines(container, name) == kept, name  # everyone else's, byte for byte
    etags = await _etags(container)
    assert etags[f"portal/{BLOBS}.jsonl"] == seeded.etags[f"portal/{BLOBS}.jsonl"]
    assert etags["archive/1.jsonl"] == seeded.etags["archive/1.jsonl"]
    shown = repr(outcome.model_dump())
    assert "@example.org" not in shown and "p-1" not in shown

    props = await container.get_blob_client("portal/0.jsonl").get_blob_properties()
    assert props.metadata["lethe_request"] == f"{batch.request_id}#{batch.batch}"
    owners = seeded.owners["portal/0.jsonl"]
    assert props.metadata["lethe_records"] == str(sum(1 for whose in owners if whose))
    marked = dict(part.split(":") for part in props.metadata["lethe_subjects"].split(","))
    mine = Counter(i for whose in owners for i in whose)
    assert {int(k): int(v) for k, v in marked.items()} == dict(mine)

    # Again (the deferred phase's re-run, or a retry): nothing written, the counts by the marks.
    counted.writes.clear()
    again = await counted.erase_batch(batch)
    assert counted.writes == Counter()
    assert await _etags(container) == etags
    assert [o.affected for o in again.outcomes] == expected
    assert again.evidence["first_attempt_evidence"] == "blob metadata"
    assert {o.status for o in again.outcomes} == {"done"}
    verified = await counted.verify_batch(batch, outcome)
    assert {o.status for o in verified.outcomes} == {"done"}


async def test_a_batch_redacts_in_each_subjects_tenant_only(
    container: ContainerClient, counted: Counting
) -> None:
    seeded = await _seed(container, tenants=True)
    batch = _batch(seeded, action="redact")

    outcome = await counted.erase_batch(batch)

    assert counted.writes == Counter({name: 1 for name in seeded.holding()})
    assert {o.status for o in outcome.outcomes} == {"done"}, outcome.outcomes[:3]
    assert [o.affected for o in outcome.outcomes] == seeded.expected()
    assert outcome.evidence["records_without_tenant"] == 0
    twins = 0
    for name, lines in seeded.blobs.items():
        after = await _lines(container, name)
        assert len(after) == len(lines)
        for was, now, whose in zip(lines, after, seeded.owners[name], strict=True):
            if not whose:
                assert now == was  # others, and st-john's subjects with the batch's ids
                twins += b"st-john" in was
                continue
            record = json.loads(now)
            assert {record.get("patient_id"), record.get("email")} <= {"[redacted]", None}
            assert record["tenant"] in ("st-mary", "st-luke")
    assert twins > 0
    verified = await counted.verify_batch(batch, outcome)
    assert {o.status for o in verified.outcomes} == {"done"}
    assert verified.evidence["records_redacted_present"] == sum(seeded.expected()) - 1


class _WorkerLost(BaseException):
    """Stands for the end of the worker's process: nothing after it runs, nothing is caught."""


class _LostAfterFirstBlob(LogRedactor):
    """Loses its worker right after the first blob that holds the batch's records."""

    async def _erase_blob(self, blob: BlobClient, *args: Any) -> None:
        await super()._erase_blob(blob, *args)
        raise _WorkerLost


def _env(attempt: int = 1, details: list[Any] | None = None) -> ActivityEnvironment:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        env.info, task_queue="lethe-eu", attempt=attempt, heartbeat_details=details or []
    )
    return env


async def test_a_retry_without_heartbeats_counts_each_subject_by_the_marks(
    clients: Clients, connectors: Connectors, blob_connection: str, container: ContainerClient
) -> None:
    seeded = await _seed(container)
    batch = _batch(seeded)
    with pytest.raises(_WorkerLost):
        await _env().run(_LostAfterFirstBlob.open(clients, blob_connection).erase_batch, batch)
    first = await container.get_blob_client("portal/0.jsonl").get_blob_properties()
    assert first.metadata["lethe_request"] == f"{batch.request_id}#{batch.batch}"

    beats: list[Any] = []
    retry = _env(attempt=2)
    retry.on_heartbeat = lambda *details: beats.extend(details)
    outcome: BatchStepOutcome = await retry.run(connectors.activity("logs.erase_batch"), batch)

    assert {o.status for o in outcome.outcomes} == {"done"}
    assert [o.affected for o in outcome.outcomes] == seeded.expected()
    evidence = outcome.evidence
    assert evidence["first_attempt_evidence"] == "blob metadata"
    assert evidence["earlier_blobs_rewritten"] == 1
    assert evidence["records_unattributed"] == 0
    after = await container.get_blob_client("portal/0.jsonl").get_blob_properties()
    assert after.etag == first.etag  # the first blob was written once, by the lost worker
    # One journal for the batch; counts by position in the heartbeats, no names, no values.
    assert {beat["lethe_effect"]["request"] for beat in beats} == {
        f"{batch.request_id}#{batch.batch}"
    }
    assert beats[-1]["progress"]["each"] == seeded.expected()
    assert "portal/" not in repr(beats) and "@example.org" not in repr(beats)


async def test_a_subject_without_a_value_to_find_fails_alone(
    container: ContainerClient, counted: Counting
) -> None:
    seeded = await _seed(container)
    by_email = seeded.locator.model_copy(update={"fields": {"email": "identity.email"}})
    seeded.locator = by_email
    nameless = seeded.subjects[5].model_copy(
        update={"subject": seeded.subjects[5].subject.model_copy(update={"identities": {}})}
    )
    subjects = [*seeded.subjects[:5], nameless, *seeded.subjects[6:]]
    batch = _batch(seeded).model_copy(update={"subjects": subjects})

    outcome = await counted.erase_batch(batch)

    failed = [(i, o) for i, o in enumerate(outcome.outcomes) if o.status != "done"]
    assert [i for i, _ in failed] == [5]
    assert "finds records by identity.email" in failed[0][1].detail
    assert outcome.evidence["subjects_unfindable"] == 1
    assert counted.writes == Counter({name: 1 for name in seeded.holding()})


async def test_verify_fails_only_the_subject_whose_record_is_back(
    container: ContainerClient, counted: Counting
) -> None:
    seeded = await _seed(container)
    batch = _batch(seeded)
    erased = await counted.erase_batch(batch)
    assert {o.status for o in erased.outcomes} == {"done"}
    # A late writer logs subject 3 again (and someone else) after the erasure.
    late = {"ts": "late", "patient_id": "p-3", "msg": "login"}
    other = {"ts": "late", "patient_id": f"p-{SUBJECTS + 1}", "msg": "login"}
    await container.upload_blob(
        "portal/9-late.jsonl", json.dumps(late).encode() + b"\n" + json.dumps(other).encode()
    )

    verified = await counted.verify_batch(batch, erased)

    failed = [(i, o) for i, o in enumerate(verified.outcomes) if o.status != "done"]
    assert [i for i, _ in failed] == [3]
    assert failed[0][1].detail == "1 log record(s) still carry the subject's values"
    assert verified.evidence["records_matching"] == 1
    assert [o.affected for o in verified.outcomes] == seeded.expected()
