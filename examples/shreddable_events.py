"""A service writes shreddable personal data with `lethe.keys.service`: a Kafka event, a backup.

Lethe cannot edit a Kafka event after it is written, nor a backup once it is taken. A service
that encrypts the personal fields under the patient's own data key makes both erasable anyway:
destroying the key (crypto-shredding) makes every copy unreadable at once. Against the stack:

    scripts/stack up
    set -a; . .stack/env; set +a
    .venv/bin/python examples/shreddable_events.py

It writes one event per patient to a Kafka topic and one backup document per patient to Azure
Blob Storage (Azurite), reads them back, shreds one patient's keys, and reads again: the same
bytes, unreadable for her, still readable for the other patient.

The shredding here calls `KeyService.shred` directly, so the example needs no worker. In a
deployment the key store is a `keys` system in the data map and `lethe erase` shreds it as a step
of the erasure (activities/shred.py: a canary first, then the shredding, then a check with a
fresh key service), with the evidence in the certificate and the ledger.

Needs LETHE_KEYS_MASTER_KEY, LETHE_SUBJECT_KEY, LETHE_KEYS_STORE_URL (or LETHE_STORE_URL),
LETHE_STACK_KAFKA_BOOTSTRAP and LETHE_STACK_BLOB_CONNECTION. The topic and blobs it makes are
removed at the end; the key store keeps the record that the patient's keys were shredded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial

from azure.core.exceptions import ResourceExistsError
from azure.storage.blob.aio import BlobServiceClient, ContainerClient
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from lethe.contracts import Subject
from lethe.kernel.config import load_settings
from lethe.kernel.database import dispose_all
from lethe.kernel.errors import KeyShredded, LetheError
from lethe.keys.service import KeyService, open_key_service

TENANT = "st-mary"
EVENTS = ("kafka", "patient-events")
"""Where event fields live: each field is bound to `place("kafka", "patient-events", field)`, so
a value copied into another system or field fails to decrypt."""
BACKUPS = ("blob", "patient-backups")
CONTAINER = "lethe-example-backups"


# --- what a service writes -------------------------------------------------------------------


async def patient_event(keys: KeyService, patient: Subject, email: str, diagnosis: str) -> bytes:
    """A `patient.updated` event: the subject reference in clear, the personal fields sealed."""
    sealed = await keys.encrypt_fields(patient, {"email": email, "diagnosis": diagnosis}, *EVENTS)
    ref = keys.subject_ref(patient.tenant, patient.subject_id)
    return json.dumps({"type": "patient.updated", "subject_ref": ref, **sealed}).encode()


async def read_event(keys: KeyService, value: bytes) -> dict[str, str]:
    """The event's personal fields, decrypted; KeyShredded once the patient is erased."""
    event = json.loads(value)
    return await keys.decrypt_fields(
        {name: event[name] for name in ("email", "diagnosis")}, *EVENTS, cached=False
    )


async def backup_document(keys: KeyService, patient: Subject, name: str, notes: str) -> bytes:
    """A backup of the patient's record, its personal fields sealed."""
    sealed = await keys.encrypt_fields(patient, {"name": name, "notes": notes}, *BACKUPS)
    return json.dumps({"record": "patient", "fields": sealed}).encode()


async def read_backup(keys: KeyService, document: bytes) -> dict[str, str]:
    """The backup's personal fields, decrypted; KeyShredded once the patient is erased."""
    return await keys.decrypt_fields(json.loads(document)["fields"], *BACKUPS, cached=False)


# --- Kafka and Azure Blob Storage, with their own clients ----------------------------------------


def create_topic(bootstrap: str, topic: str) -> None:
    """A one-partition topic for the example's events."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    deadline = time.monotonic() + 10
    while topic not in admin.list_topics(timeout=10).topics and time.monotonic() < deadline:
        time.sleep(0.1)


def delete_topic(bootstrap: str, topic: str) -> None:
    """Remove the example's topic."""
    admin = AdminClient({"bootstrap.servers": bootstrap})  # alive until the result arrives
    admin.delete_topics([topic])[topic].result(30)


def produce(bootstrap: str, topic: str, records: list[tuple[str, bytes]]) -> None:
    """Publish (key, value) records; the key is the subject reference, never the patient id."""
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    failed: list[str] = []

    def delivered(error: KafkaError | None, _: Message) -> None:
        if error is not None:
            failed.append(error.name())

    for key, value in records:
        producer.produce(topic, key=key.encode(), value=value, on_delivery=delivered)
    if producer.flush(30) or failed:
        raise RuntimeError(f"Kafka did not take the events: {', '.join(failed) or 'timeout'}")


def consume(bootstrap: str, topic: str, count: int) -> list[tuple[str, bytes]]:
    """The topic's first `count` records, as (key, value)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "lethe-example", "enable.auto.commit": False}
    )
    found: list[tuple[str, bytes]] = []
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        while len(found) < count:
            message = consumer.poll(10)
            if message is None:
                raise RuntimeError(f"no event arrived from {topic} within 10 s")
            if message.error() is None:
                found.append(((message.key() or b"").decode(), message.value() or b""))
    finally:
        consumer.close()
    return found


async def backups_container(service: BlobServiceClient) -> ContainerClient:
    """The example's container, created on first use."""
    with contextlib.suppress(ResourceExistsError):
        await service.create_container(CONTAINER)
    return service.get_container_client(CONTAINER)


# --- the story -----------------------------------------------------------------------------------


async def show(
    keys: KeyService,
    events: list[tuple[str, bytes]],
    backups: dict[str, bytes],
    names: dict[str, str],
) -> None:
    """Decrypt every event and backup as a reader with nothing cached would."""
    found: list[tuple[str, str, Callable[[], Awaitable[dict[str, str]]]]] = [
        *(("kafka event", ref, partial(read_event, keys, value)) for ref, value in events),
        *(("blob backup", ref, partial(read_backup, keys, doc)) for ref, doc in backups.items()),
    ]
    for where, ref, read in found:
        try:
            shown = str(await read())
        except KeyShredded:
            shown = "unreadable: KeyShredded (the patient's data keys are destroyed)"
        print(f"   {where}  {names[ref]:<5} (subject {ref[:12]}...)  {shown}")


async def main() -> int:
    """Write, read, shred one patient, read again."""
    settings = load_settings()
    bootstrap = os.environ.get("LETHE_STACK_KAFKA_BOOTSTRAP")
    blob_connection = os.environ.get("LETHE_STACK_BLOB_CONNECTION")
    if not bootstrap or not blob_connection:
        print("set LETHE_STACK_KAFKA_BOOTSTRAP and LETHE_STACK_BLOB_CONNECTION (.stack/env)")
        return 2
    keys = await open_key_service(settings)
    run = uuid.uuid4().hex[:8]
    ada = Subject(tenant=TENANT, subject_id=f"example-{run}-ada")
    grace = Subject(tenant=TENANT, subject_id=f"example-{run}-grace")
    refs = {p.subject_id: keys.subject_ref(p.tenant, p.subject_id) for p in (ada, grace)}
    names = {refs[ada.subject_id]: "Ada", refs[grace.subject_id]: "Grace"}
    topic = f"lethe-example-patient-events-{run}"

    print(f"1. writing one event per patient to Kafka topic {topic} and one backup each")
    records = [
        (refs[ada.subject_id], await patient_event(keys, ada, "ada@example.org", "J45 asthma")),
        (refs[grace.subject_id], await patient_event(keys, grace, "grace@example.org", "E11")),
    ]
    documents = {
        refs[ada.subject_id]: await backup_document(
            keys, ada, "Ada Lovelace", "allergic to penicillin"
        ),
        refs[grace.subject_id]: await backup_document(keys, grace, "Grace Hopper", "check-up"),
    }
    await asyncio.to_thread(create_topic, bootstrap, topic)
    async with BlobServiceClient.from_connection_string(blob_connection) as service:
        container = await backups_container(service)
        try:
            await asyncio.to_thread(produce, bootstrap, topic, records)
            for ref, document in documents.items():
                await container.upload_blob(f"{run}/{ref}.json", document, overwrite=True)
            print(f"   the event as stored: {records[0][1][:100].decode()}...")

            async def read_everything() -> None:
                events = await asyncio.to_thread(consume, bootstrap, topic, len(records))
                stored = {
                    ref: await (await container.download_blob(f"{run}/{ref}.json")).readall()
                    for ref in documents
                }
                await show(keys, events, stored, names)

            print("2. reading them back (Kafka consumer, blob download), decrypted:")
            await read_everything()

            print(f"3. erasing Ada: shredding every data key of subject {refs[ada.subject_id]}")
            destroyed = await keys.shred(refs[ada.subject_id], TENANT, f"example-{run}")
            print(f"   {destroyed} data-key version(s) destroyed")

            print("4. reading the same bytes again:")
            await read_everything()
        finally:
            for ref in documents:
                with contextlib.suppress(Exception):
                    await container.delete_blob(f"{run}/{ref}.json")
            await asyncio.to_thread(delete_topic, bootstrap, topic)
            await dispose_all()
    print(
        "Ada's event and backup were intact, byte for byte, and can never be read again.\n"
        "(The example's topic and blobs are gone now; the key store keeps the shredding record.)"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except LetheError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
