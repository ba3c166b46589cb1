"""The Kafka connector against the stack's broker: tombstones, deadlines from settings, errors."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourceType,
)

import lethe.activities.kafka
import lethe.activities.kafka_scan
from lethe.activities.clients import Clients
from lethe.activities.common import SchemaMismatch
from lethe.activities.connector import UnsupportedStep
from lethe.activities.kafka import LONG_MAX, TombstoneWriter, partition_of
from lethe.classification.datamap import KafkaTopicLocator
from lethe.contracts import Action, StepOutcome, StepRequest, Subject
from lethe.kernel.errors import ServiceUnavailable
from tests.steps import decision, step, step_request

REF = "0" * 32
Record = tuple[int, int, bytes | None, bytes | None]
"""partition, offset, key, value"""
Headers = list[tuple[str, str | bytes | None]]
MakeTopic = Callable[..., str]

FAST_COMPACTION = {
    "cleanup.policy": "compact",
    "segment.ms": "1000",
    "max.compaction.lag.ms": "1000",
}
SLOW_COMPACTION = {
    "cleanup.policy": "compact",
    "segment.ms": "60000",
    "max.compaction.lag.ms": "60000",
}
"""Compacted with a bound a minute away: a verified step is `pending_compaction`."""


@pytest.fixture
def admin(kafka_bootstrap: str) -> AdminClient:
    """An admin client of the stack's broker, for setting up and inspecting topics."""
    return AdminClient({"bootstrap.servers": kafka_bootstrap})


@pytest.fixture
def make_topic(admin: AdminClient) -> Iterator[MakeTopic]:
    """Creates uniquely named topics with the given settings; deletes them afterwards."""
    created: list[str] = []

    def make(config: dict[str, str], partitions: int = 3) -> str:
        name = f"test-kafka-{uuid.uuid4().hex[:10]}"
        admin.create_topics([NewTopic(name, partitions, 1, config=config)])[name].result(30)
        created.append(name)
        deadline = time.monotonic() + 10
        while name not in admin.list_topics(timeout=10).topics and time.monotonic() < deadline:
            time.sleep(0.1)
        return name

    yield make
    if created:
        for future in admin.delete_topics(created).values():
            future.result(30)


def _produce(
    bootstrap: str, topic: str, records: Sequence[tuple[bytes, bytes | None]]
) -> dict[bytes, set[int]]:
    """Produce as a Java application would (murmur2 partitioning); the partitions of each key."""
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random"})
    placed: dict[bytes, set[int]] = {}

    def on_delivery(error: KafkaError | None, message: Message) -> None:
        assert error is None
        key, partition = message.key(), message.partition()
        assert key is not None and partition is not None
        placed.setdefault(key, set()).add(partition)

    for key, value in records:
        producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
    assert producer.flush(30) == 0
    return placed


def _read_all(bootstrap: str, topic: str, partitions: int = 3) -> list[Record]:
    """Every record in the topic, read with assign() from each partition's start to its end."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "test", "enable.auto.commit": False}
    )
    records: list[Record] = []
    try:
        for partition in range(partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), 10)
            if high <= low:
                continue
            consumer.assign([TopicPartition(topic, partition, low)])
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                message = consumer.poll(0.5)
                if message is None or message.error() is not None:
                    continue
                offset = message.offset()
                assert offset is not None
                records.append((partition, offset, message.key(), message.value()))
                if offset >= high - 1:
                    break
    finally:
        consumer.close()
    return records


def _request(
    topic: str,
    subject_id: str,
    action: Action = "tombstone",
    *,
    request_id: str = "req-1",
    key_template: str = "patient:{subject_id}",
) -> StepRequest:
    locator = KafkaTopicLocator(topic=topic, key_template=key_template, categories=["user.contact"])
    return step_request(
        step(locator, action=action, decisions=[decision(action, rule="gdpr.default")]),
        subject=Subject(tenant="st-mary", subject_id=subject_id),
        subject_ref=REF,
        request_id=request_id,
    )


def _seed(bootstrap: str, topic: str) -> dict[bytes, set[int]]:
    """Two subjects' profile updates; the partitions each subject's key landed on."""
    records = [
        (b"patient:1", b'{"name": "Ada"}'),
        (b"patient:12", b'{"name": "Grace"}'),
        (b"patient:1", b'{"name": "Ada L."}'),
        (b"patient:12", b'{"name": "Grace H."}'),
    ]
    return _produce(bootstrap, topic, records)


def _tombstones(records: list[Record]) -> list[Record]:
    return [record for record in records if record[3] is None]


def _headers_at(bootstrap: str, topic: str, partition: int, offset: int) -> Headers:
    """The headers of the record at `offset`, read with a consumer of the test's own."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "test", "enable.auto.commit": False}
    )
    try:
        consumer.assign([TopicPartition(topic, partition, offset)])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error() is not None:
                continue
            assert message.offset() == offset
            headers = message.headers() or []
            return list(headers.items()) if isinstance(headers, dict) else list(headers)
    finally:
        consumer.close()
    raise AssertionError(f"no record at {topic}[{partition}]@{offset}")


async def _sleep_until(moment: datetime) -> None:
    await asyncio.sleep(max(0.0, (moment - datetime.now(UTC)).total_seconds()) + 0.2)


async def test_tombstone_only_for_the_subject_and_on_the_partition_of_its_records(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic
) -> None:
    topic = make_topic(FAST_COMPACTION)
    partitions = _seed(kafka_bootstrap, topic)
    request = _request(topic, "1")

    erased = await TombstoneWriter.open(clients, kafka_bootstrap).erase(request)

    assert erased.status == "running"
    assert erased.affected == 1
    assert {erased.evidence["partition"]} == partitions[b"patient:1"]
    assert erased.evidence["topic"] == topic
    assert erased.evidence["cleanup_policy"] == "compact"
    assert erased.evidence["max_compaction_lag_ms"] == 1000
    assert erased.evidence["segment_ms"] == 1000
    assert "patient:1" not in repr(erased.evidence)
    assert erased.gone_by is not None
    records = _read_all(kafka_bootstrap, topic)
    assert _tombstones(records) == [
        (erased.evidence["partition"], erased.evidence["offset"], b"patient:1", None)
    ]
    grace = [value for _, _, key, value in records if key == b"patient:12"]
    assert grace == [b'{"name": "Grace"}', b'{"name": "Grace H."}']


async def test_compaction_pending_then_at_risk_without_traffic_then_done_and_really_gone(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic
) -> None:
    topic = make_topic(FAST_COMPACTION, partitions=1)
    _seed(kafka_bootstrap, topic)
    request = _request(topic, "1")
    writer = TombstoneWriter.open(clients, kafka_bootstrap)
    erased = await writer.erase(request)

    pending = await writer.verify(request, erased)
    assert pending.status == "pending_compaction"
    assert pending.verified
    assert pending.gone_by == erased.gone_by
    assert pending.evidence["tombstone_present"] is True

    # The bound has passed, but no record has arrived since: the tombstone's segment is still
    # the active one, which Kafka never compacts.
    assert erased.gone_by is not None
    await _sleep_until(erased.gone_by)
    stalled = await writer.verify(request, erased)
    assert stalled.status == "at_risk"
    assert "when a later record arrives" in stalled.detail
    assert stalled.evidence["segment_rolled"] is False

    # A later record rolls the segment; the cleaner may take log.cleaner.backoff.ms to notice.
    _produce(kafka_bootstrap, topic, [(b"patient:12", b'{"name": "Grace Hopper"}')])
    rolled = await writer.verify(request, erased)
    assert rolled.status == "pending_compaction"
    assert rolled.gone_by is not None
    await _sleep_until(rolled.gone_by)
    done = await writer.verify(request, erased)
    assert done.status == "done", done.detail
    assert done.verified
    assert done.gone_by is None

    # "done" is not a promise about the future: the cleaner has removed Ada's records already
    # (a little grace for the cleaning pass itself), and kept Grace's.
    deadline = time.monotonic() + 10
    while True:
        records = _read_all(kafka_bootstrap, topic, partitions=1)
        ada = [value for _, _, key, value in records if key == b"patient:1"]
        if ada == [None] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert ada == [None]
    grace = [value for _, _, key, value in records if key == b"patient:12"]
    assert grace[-1] == b'{"name": "Grace Hopper"}'


async def test_compaction_without_a_lag_bound_is_at_risk(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic
) -> None:
    topic = make_topic({"cleanup.policy": "compact"})
    _seed(kafka_bootstrap, topic)
    request = _request(topic, "1")
    writer = TombstoneWriter.open(clients, kafka_bootstrap)

    erased = await writer.erase(request)
    verified = await writer.verify(request, erased)

    assert erased.status == "running"
    assert erased.gone_by is None
    assert erased.evidence["max_compaction_lag_ms"] == LONG_MAX
    assert verified.status == "at_risk"
    assert verified.gone_by is None
    assert "set max.compaction.lag.ms" in verified.detail
    assert verified.evidence["tombstone_present"] is True


async def test_delete_policy_with_infinite_retention_is_at_risk(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic
) -> None:
    topic = make_topic({"cleanup.policy": "delete", "retention.ms": "-1"})
    _seed(kafka_bootstrap, topic)
    request = _request(topic, "1")
    writer = TombstoneWriter.open(clients, kafka_bootstrap)

    verified = await writer.verify(request, await writer.erase(request))

    assert verified.status == "at_risk"
    assert "cleanup.policy=delete with retention.ms=-1 never removes data" in verified.detail
    assert verified.evidence["retention_ms"] == -1


async def test_compact_delete_takes_the_retention_bound_when_it_is_earlier(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic
) -> None:
    topic = make_topic(
        {"cleanup.policy": "compact,delete", "retention.ms": "60000", "segment.ms": "60000"}
    )
    _seed(kafka_bootstrap, topic)
    request = _request(topic, "1")
    writer = TombstoneWriter.open(clients, kafka_bootstrap)

    erased = await writer.erase(request)
    verified = await writer.verify(request, erased)

    check_ms = erased.evidence["log_retention_check_interval_ms"]
    assert isinstance(check_ms, int)
    tombstone_ms = erased.evidence["tombstone_time_ms"]
    assert isinstance(tombstone_ms, int)
    expected = datetime.fromtimestamp((tombstone_ms + 120_000 + check_ms) / 1000, UTC)
    assert verified.status == "pending_compaction"
    assert verified.gone_by == expected
    assert "cleanup.policy=delete: retention" in verified.detail


async def test_a_bound_after_the_erasure_window_is_at_risk(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic
) -> None:
    topic = make_topic({"cleanup.policy": "delete", "retention.ms": str(90 * 86_400_000)})
    _seed(kafka_bootstrap, topic)
    request = _request(topic, "1")
    writer = TombstoneWriter.open(clients, kafka_bootstrap)

    verified = await writer.verify(request, await writer.erase(request))

    assert verified.status == "at_risk"
    assert "after the erasure window ends" in verified.detail


async def test_erasing_twice_for_the_same_request_and_step_writes_one_tombstone(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic
) -> None:
    topic = make_topic(FAST_COMPACTION)
    _seed(kafka_bootstrap, topic)
    # The application's own tombstone for the key (no Lethe headers) is not Lethe's evidence.
    _produce(kafka_bootstrap, topic, [(b"patient:1", None)])
    request = _request(topic, "1")
    writer = TombstoneWriter.open(clients, kafka_bootstrap)

    first = await writer.erase(request)
    # Later traffic on the partition, then the retry (as after a crash before completion).
    _produce(kafka_bootstrap, topic, [(b"patient:12", b'{"name": "Grace B."}')] * 3)
    second = await writer.erase(request)

    assert first.evidence["tombstone_reused"] is False
    assert second.evidence["tombstone_reused"] is True
    for name in ("partition", "offset", "tombstone_time_ms"):
        assert second.evidence[name] == first.evidence[name]
    assert second.affected == 1
    assert "earlier attempt" in second.detail
    assert "patient:1" not in repr(second.evidence) + second.detail
    ada = [r for r in _tombstones(_read_all(kafka_bootstrap, topic)) if r[2] == b"patient:1"]
    assert len(ada) == 2  # the application's and Lethe's one
    partition, offset = first.evidence["partition"], first.evidence["offset"]
    assert isinstance(partition, int) and isinstance(offset, int)
    assert ada[-1][:2] == (partition, offset)
    # The headers tie the tombstone to the request and step, and carry nothing personal.
    assert _headers_at(kafka_bootstrap, topic, partition, offset) == [
        ("lethe-request", b"req-1"),
        ("lethe-step", b"patient-events/0"),
    ]
    assert (await writer.verify(request, second)).status == "pending_compaction"


async def test_another_request_for_the_same_key_writes_its_own_tombstone(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic
) -> None:
    topic = make_topic(FAST_COMPACTION)
    _seed(kafka_bootstrap, topic)
    writer = TombstoneWriter.open(clients, kafka_bootstrap)

    first = await writer.erase(_request(topic, "1"))
    other = await writer.erase(_request(topic, "1", request_id="req-2"))
    again = await writer.erase(_request(topic, "1", request_id="req-2"))

    assert other.evidence["tombstone_reused"] is False
    assert other.evidence["partition"] == first.evidence["partition"]
    assert other.evidence["offset"] == first.evidence["offset"] + 1  # type: ignore[operator]
    assert again.evidence["tombstone_reused"] is True
    assert again.evidence["offset"] == other.evidence["offset"]
    tombstones = _tombstones(_read_all(kafka_bootstrap, topic))
    assert [key for _, _, key, _ in tombstones] == [b"patient:1", b"patient:1"]


async def test_the_search_for_an_earlier_tombstone_is_bounded_by_offset_and_time(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic
) -> None:
    """From an earlier attempt's heartbeat offset, or from the erasure's start by timestamp."""
    topic = make_topic(FAST_COMPACTION, partitions=1)
    _seed(kafka_bootstrap, topic)
    request = _request(topic, "1")
    erased = await TombstoneWriter.open(clients, kafka_bootstrap).erase(request)
    offset = erased.evidence["offset"]
    stamp = erased.evidence["tombstone_time_ms"]
    assert isinstance(offset, int) and isinstance(stamp, int)
    _produce(kafka_bootstrap, topic, [(b"patient:12", b'{"name": "Grace B."}')])
    marks = [("lethe-request", b"req-1"), ("lethe-step", b"patient-events/0")]

    def search(since_ms: int, earlier: int | None) -> tuple[int | None, int, int]:
        found = lethe.activities.kafka._TombstoneSearch(
            clients.kafka_readers(kafka_bootstrap), topic, 0, b"patient:1", marks
        )
        try:
            found.start(since_ms, earlier)
            begin = found.next
            while not found.finished:
                hit = found.read(5.0)
                if hit is not None:
                    return hit.offset, begin, found.end
            return None, begin, found.end
        finally:
            found.close()

    # The end is the partition's end when the search began: the seeds, the tombstone, Grace.
    assert search(0, None) == (offset, 0, offset + 2)
    assert search(0, offset) == (offset, offset, offset + 2)
    # An earlier attempt heartbeated past the tombstone's offset: not searched again.
    assert search(0, offset + 1) == (None, offset + 1, offset + 2)
    # No heartbeat: the first record stamped at or after the start is where the search begins.
    assert search(stamp + 60_000, None) == (None, offset + 2, offset + 2)
    # A heartbeat beyond the partition's end (the topic was recreated) is ignored.
    assert search(0, offset + 100) == (offset, 0, offset + 2)


async def test_partition_of_places_keys_as_the_java_partitioner_does(
    kafka_bootstrap: str, make_topic: MakeTopic
) -> None:
    topic = make_topic({}, partitions=7)
    keys = [f"patient:{n}".encode() for n in range(300)]
    keys += [b"", b"a", b"ab", b"abc", "Zoë-€".encode()]
    placed = _produce(kafka_bootstrap, topic, [(key, b"x") for key in keys])

    assert {key: {partition_of(key, 7)} for key in keys} == placed


async def test_preflight_of_a_good_topic_finds_nothing_and_writes_nothing(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic
) -> None:
    topic = make_topic(FAST_COMPACTION)
    _seed(kafka_bootstrap, topic)
    writer = TombstoneWriter.open(clients, kafka_bootstrap)
    before = _read_all(kafka_bootstrap, topic)

    assert await writer.preflight(_request(topic, "1")) == []
    assert _read_all(kafka_bootstrap, topic) == before


async def test_preflight_names_a_missing_topic_and_does_not_create_it(
    clients: Clients, kafka_bootstrap: str, admin: AdminClient
) -> None:
    topic = f"test-kafka-missing-{uuid.uuid4().hex[:10]}"

    problems = await TombstoneWriter.open(clients, kafka_bootstrap).preflight(
        _request(topic, "secret-subject-3")
    )

    assert problems == [
        f"Kafka topic '{topic}' of system 'patient-events' does not exist "
        "(Lethe never creates topics)"
    ]
    await asyncio.sleep(0.5)
    assert topic not in admin.list_topics(timeout=10).topics


async def test_preflight_names_a_key_template_the_request_cannot_fill(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic
) -> None:
    topic = make_topic(FAST_COMPACTION)
    request = _request(topic, "secret-subject-4", key_template="patient:{identity.mrn}")

    problems = await TombstoneWriter.open(clients, kafka_bootstrap).preflight(request)

    assert len(problems) == 1
    assert f"Kafka topic '{topic}' of system 'patient-events'" in problems[0]
    assert "{identity.mrn}" in problems[0]
    assert "secret" not in problems[0]


async def test_preflight_of_an_unreachable_broker_raises_within_seconds() -> None:
    # Clients of their own, closed afterwards, so they stop reconnecting to the dead address.
    async with Clients() as clients:
        writer = TombstoneWriter.open(clients, "127.0.0.1:1")
        started = time.monotonic()

        with pytest.raises(ServiceUnavailable) as raised:
            await writer.preflight(_request("patient-profile", "secret-subject-7"))

    assert time.monotonic() - started < 10
    assert raised.value.retryable
    assert str(raised.value).startswith("Kafka at 127.0.0.1:1")
    assert "secret" not in str(raised.value)


async def test_verify_fails_when_the_recorded_offset_is_not_the_tombstone(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic
) -> None:
    topic = make_topic(FAST_COMPACTION, partitions=1)
    _seed(kafka_bootstrap, topic)
    request = _request(topic, "1")
    writer = TombstoneWriter.open(clients, kafka_bootstrap)
    erased = await writer.erase(request)
    # Offset 1 holds Grace's first profile, not a tombstone.
    wrong = StepOutcome.model_validate(
        {**erased.model_dump(), "evidence": {**erased.evidence, "offset": 1}}
    )

    verified = await writer.verify(request, wrong)

    assert verified.status == "failed"
    assert "is not the tombstone" in verified.detail
    assert "patient" not in verified.detail


async def test_a_missing_topic_is_a_schema_mismatch_and_produces_nothing(
    clients: Clients, kafka_bootstrap: str, admin: AdminClient
) -> None:
    topic = f"test-kafka-missing-{uuid.uuid4().hex[:10]}"

    with pytest.raises(SchemaMismatch, match=f"Kafka topic '{topic}' of system 'patient-events'"):
        await TombstoneWriter.open(clients, kafka_bootstrap).erase(_request(topic, "1"))

    # Producing would have made the broker auto-create the topic.
    await asyncio.sleep(0.5)
    assert topic not in admin.list_topics(timeout=10).topics


async def test_a_retain_step_is_refused_and_writes_nothing(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic
) -> None:
    """The regional workflow records retain steps itself: a connector given one refuses it."""
    topic = make_topic(FAST_COMPACTION)
    _seed(kafka_bootstrap, topic)
    request = _request(topic, "1", action="retain")
    writer = TombstoneWriter.open(clients, kafka_bootstrap)

    with pytest.raises(UnsupportedStep, match="kept by policy"):
        await writer.erase(request)

    assert _tombstones(_read_all(kafka_bootstrap, topic)) == []


async def test_an_unreachable_broker_is_retryable_and_names_no_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(lethe.activities.kafka, "TIMEOUT_SECONDS", 1.0)
    request = _request("patient-profile", "secret-subject-7")
    # Clients of their own, closed afterwards, so they stop reconnecting to the dead address.
    async with Clients() as clients:
        writer = TombstoneWriter.open(clients, "127.0.0.1:1")

        with pytest.raises(ServiceUnavailable) as raised:
            await writer.erase(request)

    assert raised.value.retryable
    assert str(raised.value).startswith("Kafka at 127.0.0.1:1")
    assert "secret" not in str(raised.value)
    assert raised.value.__cause__ is None
    # librdkafka's own text can quote keys; it never reaches the message.
    leaked = writer._unavailable(KafkaException("failed for key patient:secret-subject-7"))
    assert str(leaked) == "Kafka at 127.0.0.1:1 did not answer (KafkaException)"


class CountingAdmin:
    """The worker's admin client, counting the topics whose settings it is asked to describe."""

    def __init__(self, admin: AdminClient) -> None:
        self._admin = admin
        self.topics_described = 0

    def describe_configs(self, resources: list[ConfigResource], **kwargs: Any) -> Any:
        """Count the topics among `resources`, then describe them."""
        self.topics_described += sum(r.restype == ResourceType.TOPIC for r in resources)
        return self._admin.describe_configs(resources, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._admin, name)


async def test_verify_right_after_erase_judges_its_settings_and_a_later_check_reads_them(
    clients: Clients,
    kafka_bootstrap: str,
    make_topic: MakeTopic,
    admin: AdminClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Erase then verify in one activity (one writer) describe the topic once; a re-check (a
    later activity's writer, or the same writer again) reads the settings as they are then."""
    topic = make_topic(SLOW_COMPACTION)
    _seed(kafka_bootstrap, topic)
    request = _request(topic, "1")
    writer = TombstoneWriter.open(clients, kafka_bootstrap)
    counting = CountingAdmin(writer._admin)
    monkeypatch.setattr(writer, "_admin", counting)

    erased = await writer.erase(request)
    verified = await writer.verify(request, erased)

    assert verified.status == "pending_compaction"
    assert counting.topics_described == 1
    # The topic loses its compaction bound: every later check judges the settings it reads.
    unbounded = ConfigEntry(
        "max.compaction.lag.ms",
        str(LONG_MAX),
        incremental_operation=AlterConfigOpType.SET,
    )
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[unbounded])
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(30)
    later = await TombstoneWriter.open(clients, kafka_bootstrap).verify(request, erased)
    again = await writer.verify(request, erased)

    assert later.status == again.status == "at_risk"
    assert later.evidence["max_compaction_lag_ms"] == LONG_MAX
    assert counting.topics_described == 2


async def test_a_read_back_asks_for_no_more_records_than_remain_to_its_tombstone(
    clients: Clients,
    kafka_bootstrap: str,
    make_topic: MakeTopic,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Later traffic on the partition is not waited for: the read back of one tombstone asks
    the consumer for that one record."""
    topic = make_topic(SLOW_COMPACTION, partitions=1)
    _seed(kafka_bootstrap, topic)
    request = _request(topic, "1")
    writer = TombstoneWriter.open(clients, kafka_bootstrap)
    erased = await writer.erase(request)
    _produce(kafka_bootstrap, topic, [(b"patient:12", b'{"name": "Grace B."}')] * 20)
    asked: list[int] = []
    take = lethe.activities.kafka_scan.take

    def counted(consumer: Consumer, most: int, wait: float = 0.5) -> list[Message]:
        asked.append(most)
        return take(consumer, most, wait)

    monkeypatch.setattr(lethe.activities.kafka, "take", counted)

    verified = await writer.verify(request, erased)

    assert verified.status == "pending_compaction"
    assert verified.evidence["tombstone_present"] is True
    offset = erased.evidence["offset"]
    assert isinstance(offset, int)
    assert verified.evidence["high_watermark"] == offset + 21  # the tombstone, then Grace's 20
    assert asked == [1]


async def test_a_read_back_past_the_last_record_ends_at_the_partitions_end(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic
) -> None:
    """An offset with no record up to the partition's end (here a transaction's commit
    marker, as compaction leaves a gap) ends the read there (partition EOF): the record that
    was there is gone from the log, and the read does not hang."""
    topic = make_topic(SLOW_COMPACTION, partitions=1)
    producer = Producer(
        {"bootstrap.servers": kafka_bootstrap, "transactional.id": f"test-{uuid.uuid4().hex}"}
    )
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(topic, key=b"patient:1", value=None, partition=0)
    producer.commit_transaction(30)
    # The coordinator writes the marker after the commit returns: wait until it is in the log.
    watcher = lethe.activities.kafka_scan.reader(kafka_bootstrap, "test")
    deadline = time.monotonic() + 20
    while watcher.get_watermark_offsets(TopicPartition(topic, 0), 10)[1] < 2:
        assert time.monotonic() < deadline, "the commit marker never reached the log"
        await asyncio.sleep(0.05)
    watcher.close()
    read_back = lethe.activities.kafka._ReadBack(clients.kafka_readers(kafka_bootstrap), topic, 0)

    # Offset 0 is the tombstone, offset 1 the commit marker (no record a consumer sees).
    reads = await asyncio.to_thread(read_back.read, {0: b"patient:1", 1: b"patient:1"})
    [marker] = (await asyncio.to_thread(read_back.read, {1: b"patient:1"})).values()

    assert reads[0].offset == 0 and reads[0].key_matches and reads[0].is_tombstone
    assert (reads[1].low, reads[1].high, reads[1].offset) == (0, 2, 2)
    assert (marker.high, marker.offset) == (2, 2)


async def test_reads_reuse_the_workers_consumers_and_a_failed_read_closes_its_own(
    kafka_bootstrap: str, make_topic: MakeTopic, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The search and the read back borrow consumers from the worker's readers and give them
    back: the next step makes none. A consumer whose read failed is closed, not kept."""
    topic = make_topic(SLOW_COMPACTION)
    _seed(kafka_bootstrap, topic)
    made: list[str] = []
    reader = lethe.activities.kafka_scan.reader

    def counted(bootstrap: str, group: str, *, partition_eof: bool = False) -> Consumer:
        made.append(group)
        return reader(bootstrap, group, partition_eof=partition_eof)

    monkeypatch.setattr(lethe.activities.kafka_scan, "reader", counted)
    async with Clients() as clients:  # a worker of its own: no consumer kept yet
        for subject in ("1", "12"):
            writer = TombstoneWriter.open(clients, kafka_bootstrap)
            request = _request(topic, subject)
            verified = await writer.verify(request, await writer.erase(request))
            assert verified.status == "pending_compaction"
        assert sorted(made) == ["lethe-erase", "lethe-verify"]  # the first step's only

        readers = clients.kafka_readers(kafka_bootstrap)
        with pytest.raises(KafkaException), readers.lent("lethe-verify") as consumer:
            consumer.get_watermark_offsets(TopicPartition(topic, 7), timeout=2)
        with readers.lent("lethe-verify") as again:
            assert again is not consumer
        assert made[2:] == ["lethe-verify"]
