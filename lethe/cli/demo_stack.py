"""`lethe demo --stack`: the demo's story on the running stack, with all five kinds of system.

The sample hospital of `examples/datamap.yaml` is seeded under names of this run's own (a prefix
on the tables, the topic, the Redis keys and the containers, patient ids with the run's suffix,
its own control queue, so its own task queues): a PostgreSQL database, a compacted Kafka topic,
Redis, blob backups and JSON-lines logs in Azure blob storage. A control worker and region
`eu`'s worker run in this process against the stack's Temporal server; Lethe's store is the
stack's (`LETHE_STORE_URL`). The pack is GDPR's with a 30-second erasure window instead of 30
days, so backups and logs are erased while you watch; meanwhile the hospital keeps working (a
new patient registers), which is what lets Kafka compact the erased patient's records away. At
the end the run's data is removed from the stack; its requests stay in Lethe's ledger.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient
from temporalio.client import Client as TemporalClient

from lethe import worker as lethe_worker
from lethe.activities.clients import Clients
from lethe.activities.connectors import Connectors
from lethe.activities.kafka import partition_of
from lethe.cli.common import err, out
from lethe.cli.demo import WindowHook, encrypted_line, erase_one, patients_table, request_for
from lethe.cli.erasure import Watch
from lethe.contracts import ErasureStatus
from lethe.examples.seed import TOPIC, Connections, Patient, drop_all, sample_patients, seed_all
from lethe.examples.seed import sql_prefix as table_prefix
from lethe.kernel.config import Settings, load_settings
from lethe.kernel.database import dispose_all
from lethe.kernel.errors import ConfigurationError, ServiceUnavailable
from lethe.kernel.probes import (
    TIMEOUT_SECONDS,
    probe_blob,
    probe_redis,
    probe_sql,
    probe_temporal,
)
from lethe.policies.model import PACKS_DIR
from lethe.sdk.client import Client
from lethe.temporal.connection import connect

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = Path(".lethe") / "demo-stack"
PATIENTS = 5
TENANT = "st-mary"
WINDOW = "30s"
STACK_VARIABLES = (
    "LETHE_STACK_SQL_URL",
    "LETHE_STACK_KAFKA_BOOTSTRAP",
    "LETHE_STACK_REDIS_URL",
    "LETHE_STACK_BLOB_CONNECTION",
    "LETHE_STORE_URL",
    "LETHE_SUBJECT_KEY",
    "LETHE_KEYS_MASTER_KEY",
)
"""What the stack's settings (`source .stack/env`) give and the stack demo needs."""
HOW_TO_START = "start the stack with `make stack`, then `source .stack/env` in this shell"


def _missing() -> list[str]:
    """The stack's settings that are not set."""
    return [name for name in STACK_VARIABLES if not os.environ.get(name)]


async def check_stack(settings: Settings) -> None:
    """Refuse, naming what is missing or not answering, unless every service of the stack
    answers: Temporal, Lethe's store, PostgreSQL, Kafka, Redis and blob storage."""
    missing = _missing()
    if missing:
        raise ConfigurationError(f"`lethe demo --stack` needs {', '.join(missing)}: {HOW_TO_START}")
    connections = Connections.from_stack()
    probes = (
        probe_temporal(settings.temporal_address, settings.temporal_namespace),
        probe_sql(settings.store_url.get_secret_value()),
        probe_sql(connections.sql_url),
        _probe_kafka(connections.kafka_bootstrap),
        probe_redis(connections.redis_url),
        probe_blob(connections.blob_connection),
    )
    with err.status("checking the stack: Temporal, PostgreSQL, Kafka, Redis, blob storage"):
        answers = await asyncio.gather(*probes, return_exceptions=True)
    down = [
        str(answer).rstrip(".")
        if isinstance(answer, ServiceUnavailable)
        else f"{type(answer).__name__} while checking a service"
        for answer in answers
        if isinstance(answer, BaseException)
    ]
    if down:
        lines = "".join(f"\n  {problem}" for problem in down)
        raise ServiceUnavailable(f"the stack is not reachable:{lines}\n{HOW_TO_START}")


async def _probe_kafka(bootstrap: str) -> str:
    """A Kafka broker answers a metadata request; librdkafka's own log stays quiet (the
    answer names the problem once)."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        await asyncio.to_thread(admin.list_topics, timeout=TIMEOUT_SECONDS)
    except KafkaException as exc:
        raise ServiceUnavailable(f"Kafka at {bootstrap}: {exc.args[0].str()}") from None
    return f"Kafka at {bootstrap}: answering"


def stack_datamap(prefix: str) -> dict[str, Any]:
    """`examples/datamap.yaml` for tenant st-mary in region eu, every table, topic, key pattern
    and container under `prefix` (as `lethe.examples.seed` names them)."""
    found: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "datamap.yaml").read_text())
    found["regions"], found["tenants"] = ["eu"], {TENANT: {"region": "eu"}}
    tables = table_prefix(prefix)
    for system in found["systems"]:
        for table in system.get("tables", []):
            table["table"] = tables + table["table"]
            for hop in table.get("via", []):
                hop["table"] = tables + hop["table"]
        for topic in system.get("topics", []):
            topic["topic"] = prefix + topic["topic"]
        for keys in system.get("keys", []):
            keys["patterns"] = [prefix + pattern for pattern in keys["patterns"]]
            for field in keys.get("hash_fields", []):
                field["key"] = prefix + field["key"]
        for holder in (*system.get("backups", []), *system.get("logs", [])):
            holder["container"] = prefix + holder["container"]
    return found


def demo_pack() -> dict[str, Any]:
    """GDPR's pack with a 30-second erasure window, so backups and logs go while you watch."""
    pack: dict[str, Any] = yaml.safe_load((PACKS_DIR / "gdpr.yaml").read_text())
    pack["version"] = f"{pack['version']}-demo"
    pack["description"] = f"GDPR with a {WINDOW} erasure window (lethe demo --stack only)."
    pack["erasure"].pop("window_days", None)
    pack["erasure"]["window"] = WINDOW
    return pack


def _prepare(suffix: str) -> Path:
    """Write the run's data map and pack and point this process's settings at them."""
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    datamap, pack = DEMO_DIR / "datamap.yaml", DEMO_DIR / "policy.yaml"
    datamap.write_text(yaml.safe_dump(stack_datamap(f"demo-{suffix}-"), sort_keys=False))
    pack.write_text(yaml.safe_dump(demo_pack(), sort_keys=False))
    os.environ.update(
        LETHE_DATAMAP=str(datamap),
        LETHE_POLICY=str(pack),
        LETHE_CONTROL_QUEUE=f"demo-{suffix}-control",
    )
    return DEMO_DIR


@contextlib.asynccontextmanager
async def _workers(settings: Settings) -> AsyncIterator[TemporalClient]:
    """The run's control worker and region eu's worker, in this process, on the stack's
    Temporal server."""
    temporal = await connect(settings)
    async with (
        Clients() as clients,
        lethe_worker.build_worker(temporal, "eu", settings, Connectors(clients)),
        lethe_worker.build_control_worker(temporal, settings),
    ):
        yield temporal


def _register_on(bootstrap: str, topic: str, partition: int, suffix: str) -> None:
    """A new patient registers, their profile landing on `partition` (blocking)."""
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random"})
    partitions = len(producer.list_topics(topic, 10).topics[topic].partitions)
    key = next(
        key
        for n in range(1000)
        if partition_of(key := f"patient:p-new{n}-{suffix}".encode(), partitions) == partition
    )
    producer.produce(topic, key=key, value=json.dumps({"patient_id": key.decode()[8:]}).encode())
    if producer.flush(30):
        raise ServiceUnavailable(f"Kafka did not take the new patient's record on {topic}")


def _hospital_keeps_writing(
    connections: Connections, topic: str, partition: int, suffix: str
) -> WindowHook:
    """While the window runs, a new patient registers on the erased patient's partition: a
    later record rolls the tombstone's segment, so the log cleaner can remove what it hides."""

    async def hook(watch: Watch, current: ErasureStatus) -> None:
        ends = current.window_ends_at.strftime("%H:%M:%S UTC") if current.window_ends_at else "-"
        watch.say(
            f"\nimmediate steps done; backups and logs follow when the window ends ({ends}: "
            f"{WINDOW} in this demo's pack, 30 days under GDPR's).\nMeanwhile the hospital keeps "
            "working: a new patient registers, and Kafka compacts the erased patient's profile "
            "away.\n"
        )
        await asyncio.sleep(1.5)  # past the tombstone segment's segment.ms
        await asyncio.to_thread(_register_on, connections.kafka_bootstrap, topic, partition, suffix)

    return hook


def _patients(suffix: str) -> list[Patient]:
    """Made-up patients with ids of this run's own (short: the table shows them whole)."""
    return [
        dataclasses.replace(patient, patient_id=f"p{n}-{suffix[:4]}")
        for n, patient in enumerate(sample_patients(PATIENTS), 1)
    ]


async def run_stack_demo(*, verbose: bool = False) -> int:
    """Check the stack, seed the hospital in every kind of system, and tell the story."""
    settings = load_settings()
    await check_stack(settings)
    suffix = uuid.uuid4().hex[:8]
    prefix = f"demo-{suffix}-"
    keep_in = _prepare(suffix)
    settings = load_settings()
    connections = Connections.from_stack()
    patients = _patients(suffix)
    with err.status("seeding St Mary's in PostgreSQL, Kafka, Redis and blob storage"):
        placed = await seed_all(
            connections,
            patients,
            prefix,
            subject_key=base64.b64decode(os.environ["LETHE_SUBJECT_KEY"]),
            tenant=TENANT,
        )
    err.print(
        f"seeded St Mary's with {PATIENTS} patients in PostgreSQL, Kafka, Redis and blob "
        f"storage, every name under {prefix!r}",
        soft_wrap=False,
    )
    target = patients[0]
    try:
        async with _workers(settings) as temporal:
            client = Client(temporal, settings)
            hook = _hospital_keeps_writing(
                connections, f"{prefix}{TOPIC}", placed[target.patient_id][0], suffix
            )
            request = request_for(TENANT, target)
            certificate = await erase_one(client, request, keep_in, verbose, hook)
            out.print(await encrypted_line(temporal, certificate))
        out.print()
        out.print(
            await patients_table(connections.sql_url, target.patient_id, table_prefix(prefix))
        )
    finally:
        await drop_all(connections, prefix)
        await dispose_all()
    out.print(
        f"\nThe run's tables, topic, keys and containers (under {prefix!r}) are removed from "
        "the stack; its request stays in Lethe's ledger (`lethe audit verify`).",
        highlight=False,
    )
    return 0 if certificate.outcome == "erased" else 1
