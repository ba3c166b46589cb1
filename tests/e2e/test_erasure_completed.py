"""An erasure on the real stack that Lethe can prove finished: every step `done`, the outcome
`erased`, and each system's own client agrees.

The pack is the end-to-end one (tests/e2e/policy.yaml) with a window of 30 seconds instead of
none. Kafka's bound on removal is the topic's max(segment.ms, max.compaction.lag.ms), a second
each as seeded, plus the broker's log.cleaner.backoff.ms (15 s by default) after the tombstone,
and it holds only once a later record has rolled the tombstone's segment. So the hospital keeps
writing (a patient registers on Ada's partition once her tombstone's segment is due to roll), and
when the window ends, past the bound, the workflow verifies Kafka again and finds it `done`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from confluent_kafka import KafkaError, Message, Producer

from lethe.activities.kafka import partition_of
from tests.e2e.conftest import (
    HERE,
    Hospital,
    Record,
    approve,
    certificate_of,
    erase_and_wait_for_approval,
    footprint,
    kafka_records,
    wait_for_state,
)
from tests.e2e.test_erasure_cli import STEPS, check_blobs, check_redis, check_sql

WINDOW = "30s"
SEGMENT_SECONDS = 1.0
"""The seeded topic's segment.ms (lethe.examples.seed.FAST_COMPACTION)."""


@pytest.fixture(scope="module")
def windowed(hospital: Hospital) -> Hospital:
    """The hospital under the end-to-end pack with a 30-second window."""
    pack = (HERE / "policy.yaml").read_text()
    assert "window_days: 0" in pack
    hospital.policy = hospital.workdir / "policy-window.yaml"
    hospital.policy.write_text(pack.replace("window_days: 0", f"window: {WINDOW}"))
    return hospital


def register_on(bootstrap: str, topic: str, partition: int, suffix: str) -> Record:
    """A new patient's profile, keyed as the hospital keys them, on `partition` (blocking)."""
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random"})
    partitions = len(producer.list_topics(topic, 10).topics[topic].partitions)
    key = next(
        key
        for n in range(1000)
        if partition_of(key := f"patient:pt-{suffix}-new-{n}".encode(), partitions) == partition
    )
    value = json.dumps({"patient_id": key.decode().removeprefix("patient:")}).encode()
    delivered: list[Record] = []

    def on_delivery(error: KafkaError | None, message: Message) -> None:
        assert error is None, error
        offset = message.offset()
        assert offset is not None
        delivered.append((partition, offset, key, value))

    producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
    assert producer.flush(30) == 0
    (record,) = delivered
    return record


async def test_an_erasure_past_its_window_ends_done_in_every_system(windowed: Hospital) -> None:
    hospital = windowed
    await hospital.worker().start()
    ada, grace = hospital.patients[0], hospital.patients[1]
    ada_key = f"patient:{ada.patient_id}".encode()
    partition, _ = hospital.kafka_placed[ada.patient_id]
    before = await footprint(hospital)

    workflow_id = await erase_and_wait_for_approval(hospital, ada)
    await approve(hospital, workflow_id)
    # The immediate steps are done and the deferred ones wait for the window: Kafka's tombstone
    # is written, and its removal is bounded inside the window but not yet past.
    waiting = await wait_for_state(hospital, workflow_id, "waiting_window")
    kafka = next(s for s in waiting["steps"] if s["step_id"] == "patient-events/0")
    assert kafka["status"] == "pending_compaction", kafka
    await asyncio.sleep(SEGMENT_SECONDS * 1.5)
    registered = await asyncio.to_thread(
        register_on,
        hospital.connections.kafka_bootstrap,
        hospital.topic,
        partition,
        hospital.suffix,
    )

    final = await wait_for_state(hospital, workflow_id, "completed", timeout=90)
    certificate = await certificate_of(hospital, workflow_id)
    outcomes: dict[str, dict[str, Any]] = {s["step_id"]: s for s in certificate["steps"]}
    shown = json.dumps(outcomes, indent=1)
    assert {step: outcome["status"] for step, outcome in outcomes.items()} == dict.fromkeys(
        STEPS, "done"
    ), shown
    assert all(outcome["verified"] for outcome in outcomes.values()), shown
    assert certificate["outcome"] == "erased"
    assert {s["step_id"]: s["status"] for s in final["steps"]} == dict.fromkeys(STEPS, "done")
    tombstone = outcomes["patient-events/0"]
    assert tombstone["evidence"]["segment_rolled"] is True
    assert tombstone["detail"].startswith("earlier records were gone by"), shown

    after = await footprint(hospital)
    await check_sql(hospital, ada, grace, before, after)
    await check_redis(hospital, ada, grace, before, after)
    check_blobs(hospital, ada, grace, before, after)
    # Kafka, read from the start of every partition: the log cleaner has removed Ada's profile,
    # and her key's only record is the tombstone the certificate names. Everyone else's records
    # are all there.
    records = await asyncio.to_thread(
        kafka_records, hospital.connections.kafka_bootstrap, hospital.topic
    )
    evidence = tombstone["evidence"]
    assert [r for r in records if r[2] == ada_key] == [
        (evidence["partition"], evidence["offset"], ada_key, None)
    ]
    assert registered in records
    others = [r for r in before.kafka if r[2] != ada_key]
    assert others and all(r in records for r in others)
