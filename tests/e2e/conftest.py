"""End-to-end fixtures: the sample hospital seeded under a run's own names, workers as processes.

A `Hospital` is one isolated deployment against the stack: its own region (so its own task
queue), control queue, tenant, tables, topic, Redis keys, containers and Lethe store database,
so tests run beside other people's on the same servers without either side seeing the other's
work. The `lethe` CLI and `worker.py` run as subprocesses with that deployment's environment.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

import psycopg
import pytest
from azure.storage.blob.aio import BlobServiceClient
from confluent_kafka import Consumer, TopicPartition
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from temporalio.client import Client as TemporalClient

from bench.harness.worker_process import WorkerProcess as WorkerProcess
from lethe.examples.seed import (
    BACKUPS_CONTAINER,
    EXPORTS_CONTAINER,
    LOGS_CONTAINER,
    Connections,
    Patient,
    drop_all,
    hospital_tables,
    sample_patients,
    seed_all,
    sql_prefix,
)
from lethe.kernel.config import Settings
from lethe.kernel.subjects import subject_ref
from lethe.sdk.client import Client
from tests.conftest import stack_variable

Record = tuple[int, int, bytes | None, bytes | None]
"""A Kafka record: partition, offset, key, value."""

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
LETHE = str(Path(sys.executable).parent / "lethe")
PATIENTS = 4


@dataclass(frozen=True)
class CliResult:
    """What one `lethe` command did."""

    args: tuple[str, ...]
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        """The command's stdout as JSON."""
        return json.loads(self.stdout)

    def __str__(self) -> str:
        return f"lethe {' '.join(self.args)} -> {self.code}\n{self.stdout}\n{self.stderr}"


@dataclass
class Hospital:
    """The sample hospital deployed under one run's names, with its data seeded."""

    suffix: str
    workdir: Path
    connections: Connections
    store_url: str
    subject_key: bytes
    patients: list[Patient]
    kafka_placed: dict[str, tuple[int, int]] = field(default_factory=dict)
    policy: Path = HERE / "policy.yaml"
    """The policy pack of the run's workers and commands (LETHE_POLICY)."""
    workers: list[WorkerProcess] = field(default_factory=list)
    _client: Client | None = field(default=None, repr=False)

    @property
    def region(self) -> str:
        """The run's region: its worker polls `lethe-<region>`."""
        return f"e2e{self.suffix}"

    @property
    def tenant(self) -> str:
        """The run's tenant."""
        return f"st-mary-{self.suffix}"

    @property
    def control_queue(self) -> str:
        """The run's control queue."""
        return f"lethe-e2e-{self.suffix}-control"

    @property
    def prefix(self) -> str:
        """The prefix of the run's topic, Redis keys and containers."""
        return f"e2e-{self.suffix}-"

    @property
    def topic(self) -> str:
        """The run's patient-profile topic."""
        return f"{self.prefix}patient-profile"

    def container(self, name: str) -> str:
        """The run's container called `name` in examples/datamap.yaml."""
        return f"{self.prefix}{name}"

    def tables(self) -> tuple[Any, Any, Any]:
        """The run's patients, appointments and lab_results tables (SQLAlchemy Core)."""
        _, patients, appointments, lab_results = hospital_tables(sql_prefix(self.prefix))
        return patients, appointments, lab_results

    @property
    def datamap(self) -> Path:
        """The run's data map file."""
        return self.workdir / "datamap.yaml"

    @property
    def env(self) -> dict[str, str]:
        """The environment of the run's CLI commands and workers."""
        return {
            **os.environ,
            "LETHE_DATAMAP": str(self.datamap),
            "LETHE_POLICY": str(self.policy),
            "LETHE_CONTROL_QUEUE": self.control_queue,
            "LETHE_STORE_URL": self.store_url,
            "LETHE_WORKER_SHUTDOWN_GRACE_SECONDS": "5",
            "PYTHONUNBUFFERED": "1",
            "COLUMNS": "200",
        }

    def ref(self, patient: Patient) -> str:
        """The subject reference of a patient of the run's tenant."""
        return subject_ref(self.tenant, patient.patient_id, self.subject_key)

    def workflow_id(self, patient: Patient) -> str:
        """The erasure workflow id of a patient."""
        return f"erasure-{self.ref(patient)}"

    async def sdk(self) -> Client:
        """Lethe's SDK client with the run's settings, for waiting without a process per poll."""
        if self._client is None:
            self._client = await Client.connect(
                Settings(control_queue=self.control_queue, store_url=self.store_url)
            )
        return self._client

    async def wait_for(self, workflow_id: str, state: str, timeout: float = 90) -> None:
        """Poll the status query (in process) until the request is in `state`."""
        client = await self.sdk()
        async with asyncio.timeout(timeout):
            while True:
                if (await client.status(workflow_id)).state == state:
                    return
                await asyncio.sleep(0.2)

    async def wait_listed(self, workflow_id: str, status: str, timeout: float = 30) -> None:
        """Wait until visibility (search attributes) lists the request with `status`."""
        temporal = (await self.sdk()).temporal
        query = f"WorkflowId = '{workflow_id}' AND LetheStatus = '{status}'"
        async with asyncio.timeout(timeout):
            while True:
                if [found async for found in temporal.list_workflows(query)]:
                    return
                await asyncio.sleep(0.2)

    def worker(self) -> WorkerProcess:
        """A worker process for the run's region and control queue (not started)."""
        log = self.workdir / f"worker-{len(self.workers) + 1}.log"
        found = WorkerProcess(self.region, self.env, log)
        self.workers.append(found)
        return found

    async def lethe(self, *args: str, timeout: float = 60) -> CliResult:
        """Run `lethe ARGS` with the run's environment."""
        return await run_lethe(self.env, *args, timeout=timeout)


async def run_lethe(
    env: Mapping[str, str], *args: str, timeout: float = 60, cwd: Path = ROOT
) -> CliResult:
    """Run `lethe ARGS` in `cwd` (the repository) with environment `env`; fail the test on a
    hang. Every test that runs the CLI as a process runs it through here."""
    process = await asyncio.create_subprocess_exec(
        LETHE,
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"lethe {' '.join(args)} did not finish within {timeout:g}s")
    assert process.returncode is not None
    return CliResult(args, process.returncode, stdout.decode(), stderr.decode())


def _patients(suffix: str, count: int = PATIENTS) -> list[Patient]:
    """Made-up patients whose ids and emails are unique to the run, so searches find only them."""
    return [
        dataclasses.replace(
            patient,
            patient_id=f"pt-{suffix}-{n}",
            email=f"patient{n}.{suffix}@st-mary.example",
        )
        for n, patient in enumerate(sample_patients(count, seed=None), 1)
    ]


def _store_database(suffix: str) -> tuple[str, str]:
    """A Lethe store database of the run's own on the stack's PostgreSQL: (URL, admin DSN)."""
    shared = make_url(stack_variable("LETHE_STORE_URL"))
    name = f"lethe_e2e_{suffix}"
    admin = shared.set(drivername="postgresql", database="postgres").render_as_string(
        hide_password=False
    )
    return shared.set(database=name).render_as_string(hide_password=False), admin


async def _terminate_leftovers(hospital: Hospital) -> None:
    """End the run's workflows a failed test left waiting (no worker will serve them again)."""
    temporal = (await hospital.sdk()).temporal
    query = f"LetheTenant = '{hospital.tenant}' AND ExecutionStatus = 'Running'"
    async for execution in temporal.list_workflows(query):
        await temporal.get_workflow_handle(execution.id).terminate(reason="e2e test run ended")


@pytest.fixture(scope="session")
def connections(
    sql_url: str, kafka_bootstrap: str, redis_url: str, blob_connection: str
) -> Connections:
    """The stack's data systems, each checked first: a service that is down fails by name."""
    return Connections(
        sql_url=sql_url,
        kafka_bootstrap=kafka_bootstrap,
        redis_url=redis_url,
        blob_connection=blob_connection,
    )


@pytest.fixture(scope="module")
async def hospital(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    stack_temporal: TemporalClient,
    connections: Connections,
) -> AsyncIterator[Hospital]:
    """The sample hospital seeded under this module's names, with a store database of its own;
    `PATIENTS` patients, unless the test module sets its own `PATIENTS`."""
    suffix = uuid.uuid4().hex[:8]
    workdir = tmp_path_factory.mktemp(f"hospital-{suffix}")
    store_url, admin = _store_database(suffix)
    database = make_url(store_url).database
    found = Hospital(
        suffix=suffix,
        workdir=workdir,
        connections=connections,
        store_url=store_url,
        subject_key=base64.b64decode(stack_variable("LETHE_SUBJECT_KEY")),
        patients=_patients(suffix, getattr(request.module, "PATIENTS", PATIENTS)),
    )
    template = Template((HERE / "hospital.datamap.yaml").read_text())
    found.datamap.write_text(
        template.substitute(
            region=found.region,
            tenant=found.tenant,
            prefix=found.prefix,
            sql=sql_prefix(found.prefix),
        )
    )
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
        await conn.execute(f'CREATE DATABASE "{database}"')
    try:
        found.kafka_placed = await seed_all(
            connections,
            found.patients,
            found.prefix,
            subject_key=found.subject_key,
            tenant=found.tenant,
        )
        yield found
    finally:
        for worker in found.workers:
            await worker.stop()
        await _terminate_leftovers(found)
        await drop_all(connections, found.prefix)
        async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
            await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.fixture(scope="module")
async def worker(hospital: Hospital) -> WorkerProcess:
    """A running worker for the hospital's region and control queue."""
    started = hospital.worker()
    await started.start()
    return started


# --- the DPO's commands --------------------------------------------------------------------------


async def erase_and_wait_for_approval(hospital: Hospital, patient: Patient) -> str:
    """`lethe erase` a patient; it waits until the request needs the DPO. The workflow id."""
    result = await hospital.lethe(
        "erase",
        "--tenant",
        hospital.tenant,
        "--subject",
        patient.patient_id,
        "--identity",
        f"email={patient.email}",
        "--reason",
        "Art. 17 request by letter",
        "--by",
        "clerk",
    )
    assert result.code == 0, str(result)
    workflow_id = hospital.workflow_id(patient)
    assert f"erasure request {workflow_id}" in result.stderr
    assert f"lethe approve {workflow_id}" in result.stderr  # it stopped at the DPO's decision
    return workflow_id


async def status_of(hospital: Hospital, workflow_id: str) -> dict[str, Any]:
    """`lethe status ID --json`."""
    result = await hospital.lethe("status", workflow_id, "--json")
    assert result.code == 0, str(result)
    status: dict[str, Any] = result.json()
    return status


async def wait_for_state(
    hospital: Hospital, workflow_id: str, state: str, timeout: float = 90
) -> dict[str, Any]:
    """Follow `lethe status ID --json` until the request is in `state`; that status."""
    passing = {"awaiting_approval", "erasing", "waiting_window", "verifying", "on_hold"} - {state}
    async with asyncio.timeout(timeout):
        while (status := await status_of(hospital, workflow_id))["state"] != state:
            assert status["state"] in passing, status
    return status


async def approve(hospital: Hospital, workflow_id: str) -> None:
    """`lethe approve ID --by dpo`."""
    approved = await hospital.lethe("approve", workflow_id, "--by", "dpo", "--note", "checked")
    assert approved.code == 0, str(approved)
    assert f"approved {workflow_id}" in approved.stderr


async def approve_and_complete(hospital: Hospital, workflow_id: str) -> dict[str, Any]:
    """Approve through the CLI and follow `lethe status --json` to the end; the last status."""
    await approve(hospital, workflow_id)
    return await wait_for_state(hospital, workflow_id, "completed")


async def certificate_of(hospital: Hospital, workflow_id: str) -> dict[str, Any]:
    """`lethe certificate ID --json`."""
    result = await hospital.lethe("certificate", workflow_id, "--json")
    assert result.code == 0, str(result)
    certificate: dict[str, Any] = result.json()
    return certificate


# --- what the systems hold, read with their own clients ------------------------------------------


@dataclass(frozen=True)
class Footprint:
    """Everything the hospital's systems hold under the run's names, read with their clients."""

    sql: dict[str, list[tuple[Any, ...]]]
    """Table -> every row, sorted."""
    redis: dict[str, Any]
    """Key -> its value (string, hash, or list)."""
    kafka: list[Record]
    blobs: dict[str, bytes]
    """`container/name` -> content."""
    tags: dict[str, dict[str, str]]
    """`container/name` -> index tags."""


async def sql_rows(hospital: Hospital) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the run's three tables."""
    engine = create_async_engine(hospital.connections.sql_url)
    try:
        async with engine.connect() as conn:
            return {
                table.name: sorted(tuple(row) for row in await conn.execute(select(table)))
                for table in hospital.tables()
            }
    finally:
        await engine.dispose()


async def redis_values(hospital: Hospital) -> dict[str, Any]:
    """Every key under the run's prefix and its value."""
    client: Redis = Redis.from_url(hospital.connections.redis_url, decode_responses=True)
    found: dict[str, Any] = {}
    try:
        async for key in client.scan_iter(match=f"{hospital.prefix}*", count=1000):
            kind = await client.type(key)
            if kind == "hash":
                found[key] = await client.hgetall(key)
            elif kind == "list":
                found[key] = await client.lrange(key, 0, -1)
            else:
                found[key] = await client.get(key)
    finally:
        await client.aclose()
    return found


def kafka_records(bootstrap: str, topic: str) -> list[Record]:
    """Every record in the topic, each partition read from its start to its end (blocking)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "e2e-read", "enable.auto.commit": False}
    )
    records: list[Record] = []
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        for partition in sorted(partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), 10)
            if high <= low:
                continue
            consumer.assign([TopicPartition(topic, partition, low)])
            while True:
                message = consumer.poll(10)
                assert message is not None, f"no record from {topic}[{partition}] within 10s"
                if message.error() is not None:
                    continue
                offset = message.offset()
                assert offset is not None
                records.append((partition, offset, message.key(), message.value()))
                if offset >= high - 1:
                    break
    finally:
        consumer.close()
    return records


async def blob_contents(hospital: Hospital) -> tuple[dict[str, bytes], dict[str, dict[str, str]]]:
    """Every blob of the run's containers: contents and index tags."""
    contents: dict[str, bytes] = {}
    tags: dict[str, dict[str, str]] = {}
    async with BlobServiceClient.from_connection_string(
        hospital.connections.blob_connection
    ) as service:
        for name in (EXPORTS_CONTAINER, BACKUPS_CONTAINER, LOGS_CONTAINER):
            container = service.get_container_client(hospital.container(name))
            async for blob in container.list_blobs():
                client = container.get_blob_client(blob.name)
                key = f"{name}/{blob.name}"
                contents[key] = await (await client.download_blob()).readall()
                tags[key] = dict(await client.get_blob_tags())
    return contents, tags


async def footprint(hospital: Hospital) -> Footprint:
    """What every system holds now."""
    sql, redis, kafka, (blobs, tags) = await asyncio.gather(
        sql_rows(hospital),
        redis_values(hospital),
        asyncio.to_thread(kafka_records, hospital.connections.kafka_bootstrap, hospital.topic),
        blob_contents(hospital),
    )
    return Footprint(sql=sql, redis=redis, kafka=kafka, blobs=blobs, tags=tags)
