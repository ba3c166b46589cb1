"""A shredded subject's data cannot be decrypted anywhere it was written: a Kafka event, a backup.

A service writes patient events to a real Kafka topic and a backup document to a real Azurite
container, the personal fields encrypted with `lethe.keys.service`. The erasure's key step shreds
one patient; reading both places back with the service's own clients, her fields raise KeyShredded
while the other patient's still decrypt.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from azure.storage.blob.aio import BlobServiceClient, ContainerClient
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from lethe.activities.connector import erase_and_verify
from lethe.activities.shred import KeyShredder
from lethe.classification.datamap import KeysLocator
from lethe.contracts import StepRequest, Subject
from lethe.kernel.config import Settings
from lethe.kernel.errors import KeyShredded
from lethe.keys.service import KeyService
from tests.key_stores import fresh_key_store, key_service
from tests.steps import decision, step, step_request

EVENT_PLACE = ("kafka", "patient-events")
BACKUP_PLACE = ("blob", "patient-backups")


@pytest.fixture(scope="module")
async def keys_url() -> AsyncIterator[str]:
    """A key-store database of this module's own."""
    async with fresh_key_store("everywhere") as url:
        yield url


@pytest.fixture
def topic(kafka_bootstrap: str) -> Iterator[str]:
    """A fresh single-partition topic, deleted afterwards."""
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    name = f"test-shredded-{uuid.uuid4().hex[:10]}"
    admin.create_topics([NewTopic(name, 1, 1)])[name].result(30)
    deadline = time.monotonic() + 10
    while name not in admin.list_topics(timeout=10).topics and time.monotonic() < deadline:
        time.sleep(0.1)
    yield name
    admin.delete_topics([name])[name].result(30)


@pytest.fixture
async def container(blob_connection: str) -> AsyncIterator[ContainerClient]:
    """A fresh container, deleted afterwards."""
    async with BlobServiceClient.from_connection_string(blob_connection) as service:
        client = await service.create_container(f"test-shredded-{uuid.uuid4().hex[:10]}")
        try:
            yield client
        finally:
            await client.delete_container()


def _produce(bootstrap: str, topic: str, events: list[tuple[bytes, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    failures: list[str] = []

    def delivered(error: KafkaError | None, _: Message) -> None:
        if error is not None:
            failures.append(error.name())

    for key, value in events:
        producer.produce(topic, key=key, value=value, on_delivery=delivered)
    assert producer.flush(30) == 0 and not failures, failures


def _consume(bootstrap: str, topic: str, count: int) -> list[bytes]:
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "test-shredded", "enable.auto.commit": False}
    )
    values: list[bytes] = []
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        while len(values) < count:
            message = consumer.poll(10)
            assert message is not None, f"no event from {topic} within 10s"
            if message.error() is None:
                values.append(message.value() or b"")
    finally:
        consumer.close()
    return values


def _shred_request(keys: KeyService, subject: Subject) -> StepRequest:
    locator = KeysLocator(categories=["user.contact", "user.health_and_medical"])
    return step_request(
        step(locator, action="shred", decisions=[decision("delete", rule="gdpr.default")]),
        subject=subject,
        subject_ref=keys.subject_ref(subject.tenant, subject.subject_id),
        request_id=f"req-{uuid.uuid4().hex[:12]}",
    )


async def _event(keys: KeyService, subject: Subject, patient_id: str) -> bytes:
    """A patient event as the service writes it: ids in clear, personal fields sealed."""
    sealed = await keys.encrypt_fields(
        subject,
        {"email": f"{patient_id}@example.org", "diagnosis": "J45.909 asthma"},
        *EVENT_PLACE,
    )
    return json.dumps({"type": "patient.updated", "patient": patient_id, **sealed}).encode()


async def _backup(keys: KeyService, subject: Subject, patient_id: str) -> bytes:
    """A backup document: one patient's record, its personal fields sealed."""
    sealed = await keys.encrypt_fields(
        subject, {"name": f"Patient {patient_id}", "notes": "allergic to penicillin"}, *BACKUP_PLACE
    )
    return json.dumps({"patient": patient_id, "fields": sealed}).encode()


async def test_a_shredded_subject_is_unreadable_in_kafka_and_in_backups(
    keys_url: str,
    settings: Settings,
    kafka_bootstrap: str,
    topic: str,
    container: ContainerClient,
) -> None:
    tenant = f"clinic-{uuid.uuid4().hex[:8]}"
    ada, grace = (
        Subject(tenant=tenant, subject_id="ada"),
        Subject(tenant=tenant, subject_id="grace"),
    )
    service = await key_service(
        keys_url, settings.keys_master_key_bytes, settings.subject_key_bytes
    )
    events = [(b"ada", await _event(service, ada, "ada"))]
    events.append((b"grace", await _event(service, grace, "grace")))
    await asyncio.to_thread(_produce, kafka_bootstrap, topic, events)
    backups = {
        name: await _backup(service, s, name) for name, s in (("ada", ada), ("grace", grace))
    }
    for name, document in backups.items():
        await container.upload_blob(f"{name}.json", document)
    assert b"ada@example.org" not in events[0][1] and b"asthma" not in events[0][1]

    async def read_back() -> dict[str, object]:
        """What a reader (a fresh process, nothing cached) gets from each place."""
        reader = await key_service(
            keys_url, settings.keys_master_key_bytes, settings.subject_key_bytes
        )
        found: dict[str, object] = {}
        for value in await asyncio.to_thread(_consume, kafka_bootstrap, topic, 2):
            event = json.loads(value)
            sealed = {k: event[k] for k in ("email", "diagnosis")}
            try:
                found[f"event/{event['patient']}"] = await reader.decrypt_fields(
                    sealed, *EVENT_PLACE
                )
            except KeyShredded as exc:
                found[f"event/{event['patient']}"] = exc
        for name in ("ada", "grace"):
            document = json.loads(await (await container.download_blob(f"{name}.json")).readall())
            try:
                found[f"backup/{name}"] = await reader.decrypt_fields(
                    document["fields"], *BACKUP_PLACE
                )
            except KeyShredded as exc:
                found[f"backup/{name}"] = exc
        return found

    before = await read_back()
    assert before["event/ada"] == {"email": "ada@example.org", "diagnosis": "J45.909 asthma"}
    assert before["backup/ada"] == {"name": "Patient ada", "notes": "allergic to penicillin"}

    shredder = KeyShredder(keys_url, settings.keys_master_key_bytes, settings.subject_key_bytes)
    outcome = await erase_and_verify(shredder, _shred_request(service, ada))
    assert outcome.status == "done", outcome.detail

    after = await read_back()
    assert isinstance(after["event/ada"], KeyShredded)
    assert isinstance(after["backup/ada"], KeyShredded)
    assert "crypto-shredded" in str(after["event/ada"])
    assert after["event/grace"] == before["event/grace"]
    assert after["backup/grace"] == before["backup/grace"]
    # Nothing was deleted or rewritten there: the bytes are as written, only the key is gone.
    assert await (await container.download_blob("ada.json")).readall() == backups["ada"]
