"""Kafka topics not keyed by the subject, against the stack's broker.

A topic keyed by claim id with the member inside the value is erased by tombstoning the keys
whose latest record is the subject's; a topic that cannot be edited per subject is left to its
retention, with the date by which it has removed everything older than the erasure.
"""

from __future__ import annotations

import json
from datetime import timedelta

from lethe.activities.clients import Clients
from lethe.activities.kafka import TombstoneWriter
from lethe.classification.datamap import KafkaTopicLocator
from lethe.contracts import Action, StepRequest, Subject
from tests.steps import decision, step, step_request

from .test_kafka import (
    FAST_COMPACTION,
    REF,
    MakeTopic,
    _headers_at,
    _produce,
    _read_all,
    _tombstones,
    admin,
    make_topic,
)

__all__ = ["admin", "make_topic"]  # fixtures, shared with test_kafka.py

CLAIMS = [
    (b"claim:c1", {"member": "1", "amount": 120}),
    (b"claim:c2", {"member": "12", "amount": 80}),
    (b"claim:c3", {"member": "1", "amount": 45}),
    (b"claim:c1", {"member": "1", "amount": 120, "status": "paid"}),
    (b"claim:c4", {"member": "1", "amount": 10}),
    (b"claim:c4", {"member": "2", "amount": 10, "note": "transferred"}),
]
"""Member 1's claims are c1 and c3; c4 was theirs but its latest record is member 2's."""


def _claims(locator: KafkaTopicLocator, action: Action, request_id: str = "req-1") -> StepRequest:
    return step_request(
        step(
            locator,
            action=action,
            system="claims-events",
            decisions=[decision("delete", rule="gdpr.default")],
        ),
        subject=Subject(tenant="st-mary", subject_id="1"),
        subject_ref=REF,
        request_id=request_id,
    )


def _by_member(topic: str) -> KafkaTopicLocator:
    return KafkaTopicLocator(topic=topic, value_field="member", categories=["user.financial"])


def _seed(bootstrap: str, topic: str) -> None:
    _produce(bootstrap, topic, [(key, json.dumps(value).encode()) for key, value in CLAIMS])


def _claims_topic(
    clients: Clients, bootstrap: str, make_topic: MakeTopic
) -> tuple[str, StepRequest, TombstoneWriter]:
    """A compacted topic of the claims above, the request erasing member 1, and a writer."""
    topic = make_topic(FAST_COMPACTION)
    _seed(bootstrap, topic)
    return topic, _claims(_by_member(topic), "tombstone"), TombstoneWriter.open(clients, bootstrap)


async def test_a_topic_keyed_by_claim_tombstones_the_claims_whose_latest_record_is_the_subjects(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic
) -> None:
    topic = make_topic(FAST_COMPACTION)
    _seed(kafka_bootstrap, topic)
    before = _read_all(kafka_bootstrap, topic)
    request = _claims(_by_member(topic), "tombstone")

    assert await TombstoneWriter.open(clients, kafka_bootstrap).preflight(request) == []
    erased = await TombstoneWriter.open(clients, kafka_bootstrap).erase(request)

    assert erased.status == "running"
    assert erased.affected == 2
    assert erased.evidence["keys_tombstoned"] == 2
    assert erased.evidence["keys_superseded"] == 1  # c4: now member 2's, left alone
    assert erased.evidence["records_read"] == len(CLAIMS)
    assert "claim:" not in repr(erased.evidence) and "claim:" not in erased.detail
    after = _read_all(kafka_bootstrap, topic)
    stones = _tombstones(after)
    assert sorted(key for _, _, key, _ in stones if key is not None) == [b"claim:c1", b"claim:c3"]
    for partition, offset, _, _ in stones:
        headers = _headers_at(kafka_bootstrap, topic, partition, offset)
        assert ("lethe-request", b"req-1") in headers
        assert ("lethe-step", b"claims-events/0") in headers
    # Every other record is as it was; each tombstone is on the partition of its key's records.
    assert [r for r in after if r[3] is not None] == before
    partitions = {key: partition for partition, _, key, _ in before}
    assert all(partitions[key] == partition for partition, _, key, _ in stones)

    verified = await TombstoneWriter.open(clients, kafka_bootstrap).verify(request, erased)
    assert verified.verified
    assert verified.status in ("pending_compaction", "at_risk", "done"), verified.detail
    assert verified.evidence["keys_still_the_subjects"] == 0


async def test_erasing_again_reuses_the_first_attempts_tombstones(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic
) -> None:
    topic, request, writer = _claims_topic(clients, kafka_bootstrap, make_topic)

    first = await writer.erase(request)
    second = await writer.erase(request)

    assert len(_tombstones(_read_all(kafka_bootstrap, topic))) == 2
    assert second.affected == 2
    assert second.evidence["keys_tombstoned"] == 0
    assert second.evidence["keys_reused"] == 2
    assert second.evidence["tombstones"] == first.evidence["tombstones"]


async def test_a_record_of_the_subject_written_after_the_erasure_fails_verification(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic
) -> None:
    topic, request, writer = _claims_topic(clients, kafka_bootstrap, make_topic)
    erased = await writer.erase(request)
    _produce(kafka_bootstrap, topic, [(b"claim:c9", json.dumps({"member": "1"}).encode())])

    verified = await writer.verify(request, erased)

    assert verified.status == "failed"
    assert "1 key" in verified.detail and "claim:" not in verified.detail


async def test_a_record_that_is_not_json_makes_the_step_at_risk(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic
) -> None:
    topic, request, writer = _claims_topic(clients, kafka_bootstrap, make_topic)
    _produce(kafka_bootstrap, topic, [(b"claim:c7", b"member=1;amount=3")])

    verified = await writer.verify(request, await writer.erase(request))

    assert verified.evidence["records_unreadable"] == 1
    assert verified.status == "at_risk"
    assert "not JSON" in verified.detail and "member=1" not in verified.detail


async def test_a_topic_that_is_not_compacted_cannot_be_edited_by_value(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic
) -> None:
    topic = make_topic({"cleanup.policy": "delete"})
    _seed(kafka_bootstrap, topic)
    request = _claims(_by_member(topic), "tombstone")
    writer = TombstoneWriter.open(clients, kafka_bootstrap)

    problems = await writer.preflight(request)

    assert len(problems) == 1 and "removal: retention" in problems[0], problems
    assert _tombstones(_read_all(kafka_bootstrap, topic)) == []


async def test_a_topic_left_to_retention_writes_nothing_and_gives_its_date(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic
) -> None:
    settings = {"cleanup.policy": "delete", "retention.ms": "3600000", "segment.ms": "600000"}
    topic = make_topic(settings)
    _seed(kafka_bootstrap, topic)
    before = _read_all(kafka_bootstrap, topic)
    locator = KafkaTopicLocator(topic=topic, removal="retention", categories=["user.financial"])
    request = _claims(locator, "expire")
    writer = TombstoneWriter.open(clients, kafka_bootstrap)

    assert await writer.preflight(request) == []
    erased = await writer.erase(request)
    verified = await writer.verify(request, erased)

    assert _read_all(kafka_bootstrap, topic) == before  # nothing written
    assert erased.gone_by is not None
    lower = request.erasure_started_at + timedelta(milliseconds=3600000 + 600000)
    assert lower <= erased.gone_by <= lower + timedelta(minutes=10)
    assert verified.status == "pending_compaction"
    assert verified.gone_by == erased.gone_by
    assert "retention" in verified.detail and erased.gone_by.isoformat() in verified.detail


async def test_a_topic_whose_retention_never_removes_anything_is_at_risk(
    clients: Clients, kafka_bootstrap: str, make_topic: MakeTopic
) -> None:
    topic = make_topic({"cleanup.policy": "delete", "retention.ms": "-1"})
    locator = KafkaTopicLocator(topic=topic, removal="retention", categories=["user.financial"])
    request = _claims(locator, "expire")
    writer = TombstoneWriter.open(clients, kafka_bootstrap)

    verified = await writer.verify(request, await writer.erase(request))

    assert verified.status == "at_risk"
    assert verified.gone_by is None
    assert "retention.ms=-1" in verified.detail
