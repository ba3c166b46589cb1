"""Bulk erasure on Kafka against the stack's broker: a batch of subjects, one flush, one read.

A batch tombstones every subject's key (or, by value, every key whose latest record is one of
theirs, found in one read of the topic) with one flush, reads the tombstones back per
partition, and judges the topic's settings once for the batch; a second call (a retry after a
lost worker) finds the first call's tombstones by their headers and writes none.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from temporalio.testing import ActivityEnvironment

import lethe.activities.kafka
from lethe.activities.clients import Clients
from lethe.activities.kafka import TombstoneWriter, partition_of
from lethe.classification.datamap import KafkaTopicLocator
from lethe.contracts import (
    Action,
    BatchStepOutcome,
    BatchStepRequest,
    BulkSubject,
    Subject,
)
from tests.steps import decision, step

from .test_kafka import MakeTopic, _produce, admin, make_topic

__all__ = ["admin", "make_topic"]  # fixtures, shared with test_kafka.py

COMPACTED = {
    "cleanup.policy": "compact",
    "segment.ms": "60000",
    "max.compaction.lag.ms": "60000",
}
"""Compacted with a bound a minute away: a verified batch is `pending_compaction`."""
SUBJECTS = 300
OTHERS = 200
"""Keys of people outside the batch, in the same topic."""
Latest = dict[bytes, tuple[int, int, bytes | None, list[tuple[str, str | bytes | None]]]]
"""key -> partition, offset, value, headers of its latest record"""


class CountingProducer:
    """The worker's producer, counting what the connector asks of it (produce, flush, poll)."""

    def __init__(self, producer: Producer) -> None:
        self._producer = producer
        self.produced = 0
        self.flushes = 0

    def produce(self, *args: Any, **kwargs: Any) -> None:
        """Count, then produce."""
        self.produced += 1
        self._producer.produce(*args, **kwargs)

    def flush(self, *args: Any) -> int:
        """Count, then flush."""
        self.flushes += 1
        return self._producer.flush(*args)

    def poll(self, *args: Any) -> int:
        """Poll (serving delivery reports)."""
        return self._producer.poll(*args)


def _ref(number: int) -> str:
    return f"{number:032x}"


def _batch(
    locator: KafkaTopicLocator,
    action: Action,
    ids: Sequence[int],
    *,
    request_id: str = "bulk-1",
    number: int = 0,
    identities: dict[int, dict[str, str]] | None = None,
) -> BatchStepRequest:
    """One batch of a bulk request erasing the subjects `ids` (references from the numbers)."""
    started = datetime.now(UTC)
    return BatchStepRequest(
        request_id=request_id,
        batch=number,
        step=step(locator, action=action, decisions=[decision(action, rule="gdpr.default")]),
        subjects=[
            BulkSubject(
                subject_ref=_ref(i),
                subject=Subject(
                    tenant="st-mary",
                    subject_id=str(i),
                    identities=(identities or {}).get(i, {}),
                ),
            )
            for i in ids
        ],
        erasure_started_at=started,
        window_ends_at=started + timedelta(days=30),
    )


def _by_key(topic: str, key_template: str = "patient:{subject_id}") -> KafkaTopicLocator:
    return KafkaTopicLocator(topic=topic, key_template=key_template, categories=["user.contact"])


def _latest(bootstrap: str, topic: str, partitions: int = 3) -> tuple[Latest, int]:
    """Each key's latest record (with its headers), and how many tombstones the topic holds."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "test", "enable.auto.commit": False}
    )
    latest: Latest = {}
    tombstones = 0
    try:
        for partition in range(partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), 10)
            if high <= low:
                continue
            consumer.assign([TopicPartition(topic, partition, low)])
            deadline = time.monotonic() + 30
            offset = -1
            while offset < high - 1 and time.monotonic() < deadline:
                for message in consumer.consume(500, 0.5):
                    if message.error() is not None:
                        continue
                    key, offset = message.key(), message.offset() or 0
                    headers = message.headers() or []
                    pairs = list(headers.items()) if isinstance(headers, dict) else headers
                    assert key is not None
                    latest[key] = (partition, offset, message.value(), list(pairs))
                    tombstones += message.value() is None
            assert offset >= high - 1, f"partition {partition} not read to its end"
    finally:
        consumer.close()
    return latest, tombstones


def _seed(bootstrap: str, topic: str, count: int) -> None:
    """Two profile records for each of `count` patients (keys patient:0 ...)."""
    records = [
        (f"patient:{n}".encode(), json.dumps({"name": f"n{n}", "v": v}).encode())
        for v in (1, 2)
        for n in range(count)
    ]
    _produce(bootstrap, topic, records)


def _counting(writer: TombstoneWriter, monkeypatch: pytest.MonkeyPatch) -> CountingProducer:
    counting = CountingProducer(writer._producer)
    monkeypatch.setattr(writer, "_producer", counting)
    return counting


def _places(outcome: BatchStepOutcome) -> list[list[int] | None]:
    recorded = outcome.evidence["tombstones"]
    assert isinstance(recorded, str)
    places: list[list[int] | None] = json.loads(recorded)
    return places


async def test_a_batch_tombstones_every_subjects_key_with_one_flush(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = make_topic(COMPACTED)
    _seed(kafka_bootstrap, topic, SUBJECTS + OTHERS)
    before, _ = _latest(kafka_bootstrap, topic)
    writer = TombstoneWriter.open(clients, kafka_bootstrap)
    counting = _counting(writer, monkeypatch)
    reads: list[int] = []
    read_back = lethe.activities.kafka._ReadBack.read

    def counted(self: Any, wanted: dict[int, bytes]) -> Any:
        reads.append(len(wanted))
        return read_back(self, wanted)

    monkeypatch.setattr(lethe.activities.kafka._ReadBack, "read", counted)
    batch = _batch(_by_key(topic), "tombstone", range(SUBJECTS))

    outcome = await writer.erase_batch(batch)

    assert TombstoneWriter.batching
    assert counting.flushes == 1 and counting.produced == SUBJECTS
    assert len(reads) == 3 and sum(reads) == SUBJECTS  # verified with one read a partition
    assert [o.subject_ref for o in outcome.outcomes] == [_ref(i) for i in range(SUBJECTS)]
    assert {o.status for o in outcome.outcomes} == {"pending_compaction"}, outcome.detail
    assert outcome.affected == SUBJECTS
    assert outcome.gone_by is not None
    assert outcome.evidence["tombstones_written"] == SUBJECTS
    assert outcome.evidence["tombstones_reused"] == 0
    assert outcome.evidence["tombstones_present"] == SUBJECTS
    assert "patient:" not in repr(outcome.model_dump())
    after, tombstones = _latest(kafka_bootstrap, topic)
    assert tombstones == SUBJECTS  # one a subject
    for n, place in enumerate(_places(outcome)):
        key = f"patient:{n}".encode()
        partition, offset, value, headers = after[key]
        assert place is not None and place[:2] == [partition, offset]
        assert value is None
        assert partition == partition_of(key, 3)  # where the key's records are
        assert headers == [
            ("lethe-request", b"bulk-1"),
            ("lethe-step", b"patient-events/0"),
            ("lethe-batch", b"0"),
            ("lethe-subject", _ref(n).encode()),
        ]
    for n in range(SUBJECTS, SUBJECTS + OTHERS):
        key = f"patient:{n}".encode()
        assert after[key] == before[key]  # everyone else's latest record as it was


async def test_a_second_call_finds_the_batchs_tombstones_and_writes_none(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = make_topic(COMPACTED)
    _seed(kafka_bootstrap, topic, SUBJECTS)
    writer = TombstoneWriter.open(clients, kafka_bootstrap)
    batch = _batch(_by_key(topic), "tombstone", range(SUBJECTS))
    # A first attempt that tombstoned only the first half before its worker was lost.
    half = batch.model_copy(update={"subjects": batch.subjects[: SUBJECTS // 2]})
    first = await writer.erase_batch(half)
    _produce(kafka_bootstrap, topic, [(b"someone:else", b"{}")] * 5)  # later traffic
    counting = _counting(writer, monkeypatch)

    retry = await writer.erase_batch(batch)
    again = await writer.erase_batch(batch)

    assert counting.flushes == 1 and counting.produced == SUBJECTS - SUBJECTS // 2
    assert retry.evidence["tombstones_reused"] == SUBJECTS // 2
    assert retry.evidence["tombstones_written"] == SUBJECTS - SUBJECTS // 2
    assert _places(retry)[: SUBJECTS // 2] == _places(first)
    assert again.evidence["tombstones_reused"] == SUBJECTS
    assert again.evidence["tombstones_written"] == 0
    assert _places(again) == _places(retry)
    assert {o.status for o in again.outcomes} == {"pending_compaction"}
    assert {o.detail for o in again.outcomes} == {"tombstone of an earlier attempt found"}
    _, tombstones = _latest(kafka_bootstrap, topic)
    assert tombstones == SUBJECTS
    # Another batch of the same request is another effect: its own tombstones.
    other = await writer.erase_batch(batch.model_copy(update={"batch": 1}))
    assert other.evidence["tombstones_written"] == SUBJECTS


async def test_a_subject_whose_key_cannot_be_made_fails_alone(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic
) -> None:
    topic = make_topic(COMPACTED)
    _seed(kafka_bootstrap, topic, 5)
    writer = TombstoneWriter.open(clients, kafka_bootstrap)
    mrns = {n: {"mrn": str(n)} for n in (0, 1, 3, 4)}  # subject 2 has no MRN
    locator = _by_key(topic, "patient:{identity.mrn}")

    outcome = await writer.erase_batch(_batch(locator, "tombstone", range(5), identities=mrns))

    statuses = [o.status for o in outcome.outcomes]
    assert statuses == ["pending_compaction"] * 2 + ["failed"] + ["pending_compaction"] * 2
    assert outcome.outcomes[2].detail.startswith("MissingIdentity: ")
    assert "{identity.mrn}" in outcome.outcomes[2].detail
    assert outcome.evidence["subjects_failed"] == 1
    assert _places(outcome)[2] is None
    _, tombstones = _latest(kafka_bootstrap, topic)
    assert tombstones == 4


async def test_a_recheck_fails_only_the_subject_whose_tombstone_is_not_there(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic
) -> None:
    topic = make_topic(COMPACTED)
    _seed(kafka_bootstrap, topic, 20)
    writer = TombstoneWriter.open(clients, kafka_bootstrap)
    batch = _batch(_by_key(topic), "tombstone", range(20))
    erased = await writer.erase_batch(batch)
    places = _places(erased)
    wrong = places[7]
    assert wrong is not None
    places[7] = [wrong[0], 0, wrong[2]]  # a profile record of someone, not the tombstone
    tampered = erased.model_copy(
        update={"evidence": {**erased.evidence, "tombstones": json.dumps(places)}}
    )

    rechecked = await writer.verify_batch(batch, tampered)

    assert rechecked.outcomes[7].status == "failed"
    assert "is not the tombstone" in rechecked.outcomes[7].detail
    assert [o.status for i, o in enumerate(rechecked.outcomes) if i != 7] == [
        "pending_compaction"
    ] * 19
    assert rechecked.evidence["tombstones_not_found"] == 1


def _members(topic: str) -> KafkaTopicLocator:
    return KafkaTopicLocator(topic=topic, value_field="member", categories=["user.financial"])


async def test_a_topic_keyed_by_claim_is_read_once_for_the_whole_batch(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Members 0..99 each have two claims; claim b of member 0 was transferred to member 999.
    The batch erases members 0..49 and 500 (who has no claim)."""
    topic = make_topic(COMPACTED)
    claims = [
        (f"claim:{n}{part}".encode(), json.dumps({"member": str(n), "amount": n}).encode())
        for n in range(100)
        for part in "ab"
    ]
    claims.append((b"claim:0b", json.dumps({"member": "999"}).encode()))
    _produce(kafka_bootstrap, topic, claims)
    before, _ = _latest(kafka_bootstrap, topic)
    writer = TombstoneWriter.open(clients, kafka_bootstrap)
    counting = _counting(writer, monkeypatch)
    scans = 0
    original = TombstoneWriter._scan

    async def counted(*args: Any) -> Any:
        nonlocal scans
        scans += 1
        return await original(*args)

    monkeypatch.setattr(TombstoneWriter, "_scan", counted)
    ids = [*range(50), 500]
    batch = _batch(_members(topic), "tombstone", ids)

    outcome = await writer.erase_batch(batch)

    assert scans == 2  # one to erase, one to verify: not one a subject
    assert counting.flushes == 1 and counting.produced == 99
    affected = [o.affected for o in outcome.outcomes]
    assert affected == [1] + [2] * 49 + [0]
    statuses = [o.status for o in outcome.outcomes]
    assert statuses == ["pending_compaction"] * 50 + ["done"], outcome.detail
    assert outcome.outcomes[-1].detail == "no record of the subject in the topic"
    assert "1 key(s) no longer the subject's" in outcome.outcomes[0].detail
    assert outcome.evidence["keys_tombstoned"] == 99
    assert outcome.evidence["keys_superseded"] == 1
    assert outcome.evidence["keys_still_the_subjects"] == 0
    assert "claim:" not in repr(outcome.model_dump())
    after, tombstones = _latest(kafka_bootstrap, topic)
    assert tombstones == 99
    for key, (partition, _, value, headers) in after.items():
        member = json.loads(before[key][2] or b"{}").get("member")
        if member is not None and int(member) < 50 and key != b"claim:0b":
            assert value is None and partition == before[key][0]
            assert ("lethe-subject", _ref(int(member)).encode()) in headers
        else:
            assert after[key] == before[key]

    # The retry: one scan finds every tombstone, each attributed to its subject; none written.
    retry = await writer.erase_batch(batch)
    assert counting.flushes == 1
    assert [o.affected for o in retry.outcomes] == affected
    assert retry.evidence["keys_reused"] == 99 and retry.evidence["keys_tombstoned"] == 0
    assert {o.detail for o in retry.outcomes[1:50]} == {
        "0 tombstone(s) written, 2 of an earlier attempt found, 0 key(s) no longer the subject's"
    }
    _, tombstones = _latest(kafka_bootstrap, topic)
    assert tombstones == 99


async def test_a_batch_on_a_topic_left_to_retention_writes_nothing_and_dates_it_once(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {"cleanup.policy": "delete", "retention.ms": "3600000", "segment.ms": "600000"}
    topic = make_topic(settings)
    _seed(kafka_bootstrap, topic, 10)
    before = _latest(kafka_bootstrap, topic)
    writer = TombstoneWriter.open(clients, kafka_bootstrap)
    counting = _counting(writer, monkeypatch)
    locator = KafkaTopicLocator(topic=topic, removal="retention", categories=["user.contact"])
    batch = _batch(locator, "expire", range(50))

    outcome = await writer.erase_batch(batch)

    assert counting.produced == 0 and counting.flushes == 0
    assert _latest(kafka_bootstrap, topic) == before
    assert {o.status for o in outcome.outcomes} == {"pending_compaction"}
    assert len(outcome.outcomes) == 50
    assert outcome.gone_by is not None
    lower = batch.erasure_started_at + timedelta(milliseconds=3600000 + 600000)
    assert lower <= outcome.gone_by <= lower + timedelta(minutes=10)
    assert outcome.evidence["written"] == 0
    rechecked = await writer.verify_batch(batch, outcome)
    assert rechecked.gone_by == outcome.gone_by
    assert {o.status for o in rechecked.outcomes} == {"pending_compaction"}


class _WorkerLost(BaseException):
    """Stands for the end of the worker's process: nothing after it runs, nothing is caught."""


class _LostAfterTheTombstones(TombstoneWriter):
    """Loses its worker right after the broker acknowledged the batch's tombstones."""

    def _produce_tombstone(self, *args: Any) -> Any:
        super()._produce_tombstone(*args)
        raise _WorkerLost


def _env(attempt: int = 1, heartbeat_details: list[Any] | None = None) -> ActivityEnvironment:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        env.info, task_queue="lethe-eu", attempt=attempt, heartbeat_details=heartbeat_details or []
    )
    return env


async def test_a_retry_after_a_lost_worker_looks_where_the_first_attempt_heartbeated(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The erasure's start is an hour ahead, so a search by timestamp would find nothing: only
    the first attempt's heartbeat (per partition, where it was about to produce) leads the
    retry to its tombstones."""
    topic = make_topic(COMPACTED)
    _seed(kafka_bootstrap, topic, 60)
    batch = _batch(_by_key(topic), "tombstone", range(60))
    ahead = batch.erasure_started_at + timedelta(hours=1)
    batch = batch.model_copy(update={"erasure_started_at": ahead})
    first = _env()
    beats: list[Any] = []
    first.on_heartbeat = lambda *details: beats.append(details[0])
    with pytest.raises(_WorkerLost):
        await first.run(_LostAfterTheTombstones.open(clients, kafka_bootstrap).erase_batch, batch)
    written, tombstones = _latest(kafka_bootstrap, topic)
    assert tombstones == 60
    assert beats[-1]["topic"] == topic
    offsets = beats[-1]["offsets"]
    for n in range(60):
        partition, offset, _, _ = written[f"patient:{n}".encode()]
        assert offsets[str(partition)] <= offset

    writer = TombstoneWriter.open(clients, kafka_bootstrap)
    counting = _counting(writer, monkeypatch)
    retry = await _env(attempt=2, heartbeat_details=[beats[-1]]).run(writer.erase_batch, batch)

    assert counting.produced == 0
    assert retry.evidence["tombstones_reused"] == 60
    assert [o.status for o in retry.outcomes] == ["pending_compaction"] * 60
    _, tombstones = _latest(kafka_bootstrap, topic)
    assert tombstones == 60


async def test_a_tombstone_the_broker_refuses_fails_its_subject_alone(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic
) -> None:
    """Subject 999's key is longer than the topic takes (max.message.bytes): the broker refuses
    its tombstone; the subjects whose keys are on the other partitions are erased."""
    topic = make_topic({**COMPACTED, "max.message.bytes": "2000"})
    parts = "abcdef"
    template = "patient:" + "".join(f"{{identity.{part}}}" for part in parts)
    refused = ("patient:" + "x" * 3000).encode()
    keys = {n: f"patient:{n}-----".encode() for n in range(30)}
    ids = [n for n, key in keys.items() if partition_of(key, 3) != partition_of(refused, 3)]
    identities = {n: {"a": str(n), **dict.fromkeys(parts[1:], "-")} for n in ids}
    identities[999] = dict.fromkeys(parts, "x" * 500)
    _produce(kafka_bootstrap, topic, [(keys[n], b"{}") for n in ids])
    writer = TombstoneWriter.open(clients, kafka_bootstrap)

    outcome = await writer.erase_batch(
        _batch(_by_key(topic, template), "tombstone", [*ids, 999], identities=identities)
    )

    assert [o.status for o in outcome.outcomes] == ["pending_compaction"] * len(ids) + ["failed"]
    assert outcome.outcomes[-1].detail == (
        f"ServiceUnavailable: Kafka at {kafka_bootstrap}: delivery failed MSG_SIZE_TOO_LARGE"
    )
    assert outcome.evidence["subjects_failed"] == 1
    assert outcome.evidence["tombstones_written"] == len(ids)
    latest, tombstones = _latest(kafka_bootstrap, topic)
    assert tombstones == len(ids) and refused not in latest
    assert all(latest[keys[n]][2] is None for n in ids)
    # The worker's producer goes on: the next batch's tombstones are delivered.
    again = await writer.erase_batch(_batch(_by_key(topic), "tombstone", ids[:3], number=1))
    assert [o.status for o in again.outcomes] == ["pending_compaction"] * 3
