"""Erasure benchmark: the immediate phase's latency and throughput, against two floors.

Run it after `scripts/stack up`:

    .venv/bin/python bench/erasure.py [--requests 50] [--concurrent 100] [--poll-ms 10]
                                      [--json FILE] [--strict] [--keep-workflows]

Set-up, all uniquely named for this run and removed at the end: three PostgreSQL tables in the
stack's `patients` database (patients, soft-deleted; appointments, pseudonymised; lab results,
pseudonymised through a join), a compacted Kafka topic, Redis keys and a shared hash field, one
subject per request seeded in each, a data map holding all five kinds of system (blob and logs
are deferred-phase steps and are never reached), a policy pack without approval and with a
365-day window, a store database of its own (the ledger is append-only, so it lives and dies
with the run), and a worker process (`worker.py --region bench<id> --control`) on its own
region and control queue; later, the orchestration floor's worker on two queues of its own. A
few warm-up erasures (and warm-up floor runs) come first and are not counted.

What is measured:

1. Latency: requests one after another, each for a different subject. The clock starts just
   before `Client.erase()` and stops at the event time of the workflow's window timer
   (`TimerStarted` with a start-to-fire of a day or more). The workflow starts that timer in
   the same workflow task that sets its state to `waiting_window`, after every immediate step
   has been erased, verified and written to the ledger; the client and the dev server share a
   host and its clock. The status query is polled every 10 ms as well (`--poll-ms`; 0 follows
   the history alone), and its first `waiting_window` answer is reported beside the history
   figure; the run is invalid unless every immediate step then shows `done`,
   `pending_compaction` or `retained`.
2. Throughput: `--concurrent` requests started at once; erasures per second from the first
   `erase()` call to the last window timer. Completion is detected by long-polling each
   workflow's history (no status queries load the worker while it works); each status is
   checked once afterwards.
3. The raw floor, in the same run, on other seeded subjects: the statements the connectors
   issue (the same SQLAlchemy UPDATEs through the same psycopg async driver, one transaction
   per table), Redis SCAN + UNLINK and HDEL, and a Kafka tombstone produce + flush with the
   connector's producer settings, with a subject's systems in parallel as Lethe runs them;
   without Temporal and without verification. Sequentially for latency, all subjects at once
   for throughput.
4. The orchestration floor, in the same run: the workflow shape the design mandates, with no
   work in it (`bench/orchestration_floor.py`, started as a worker process of its own on two
   queues of this run): a parent on a control queue with a local activity for planning, one
   child on a `lethe-<region>` queue running one no-op activity per immediate step of the
   plan, in parallel, and a local activity for the ledger write. Warmed up, then one after
   another for latency and `--concurrent` at once for throughput, measured like Lethe but to
   the event time of the parent's completion (where Lethe starts its window timer), with the
   floor worker's and the server's CPU per erasure. It is what Temporal itself manages on this
   machine for that shape, so a throughput target above it cannot be met here by any work
   done inside the activities; the run says so when it is.
5. Where the time goes, from the histories: per request, the parent workflow's activities
   (queue wait and run time), the regional child workflow, and what is left (workflow-task
   round trips); inside the child, each connector's erase and verify. And the CPU time the
   worker, this process and the stack's Temporal server used per erasure (Linux /proc; the
   server's share includes anyone else using it), with how busy the machine was. The same
   breakdown for the orchestration floor, one at a time.

The targets: immediate-phase p95 <= 1 s, and >= 20 erasures per second.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import secrets
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

import yaml
from azure.storage.blob.aio import BlobServiceClient
from confluent_kafka import KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from pydantic import BaseModel
from redis.asyncio import Redis
from rich.console import Console
from rich.table import Table as RichTable
from sqlalchemy import (
    BigInteger,
    Column,
    Date,
    DateTime,
    MetaData,
    String,
    Table,
    Text,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.sql.dml import Update
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.api.workflowservice.v1 import DeleteWorkflowExecutionRequest
from temporalio.client import Client as TemporalClient

from lethe.contracts import ErasureRequest, ErasureStatus, Subject
from lethe.kernel.config import load_env_file, load_settings
from lethe.kernel.errors import LetheError
from lethe.kernel.regions import task_queue
from lethe.plans.planner import Planner
from lethe.sdk.client import Client
from lethe.temporal.connection import connect

ROOT = Path(__file__).resolve().parents[1]
STACK_ENV = ROOT / ".stack" / "env"
TENANT = "bench"
WARMUP = 3
FILLER_PATIENTS = 2000
POLL_MS = 10.0
WAIT_TIMEOUT = 300.0
WINDOW_TIMER_SECONDS = 86400
"""The window timer is the first timer of a day or more; hold re-checks would be an hour."""
FINISHED = ("done", "pending_compaction", "retained")
TARGET_P95 = 1.0
TARGET_RATE = 20.0
KAFKA_TIMEOUT = 15.0

T = TypeVar("T")
console = Console()


class BenchError(Exception):
    """The benchmark could not run or measured an invalid run (a step failed, a timeout)."""


# --- names and configuration -----------------------------------------------------------------


@dataclass(frozen=True)
class Names:
    """Every name this run creates, derived from one random id."""

    run: str

    @property
    def region(self) -> str:
        """The region, and so the task queue `lethe-bench<id>`."""
        return f"bench{self.run}"

    @property
    def control_queue(self) -> str:
        """The control queue of this run's worker."""
        return f"lethe-bench-control-{self.run}"

    @property
    def floor_region(self) -> str:
        """The orchestration floor's region, and so its child queue `lethe-bench<id>-floor`."""
        return f"bench{self.run}-floor"

    @property
    def floor_control_queue(self) -> str:
        """The orchestration floor's control queue."""
        return f"lethe-bench-floor-control-{self.run}"

    @property
    def patients(self) -> str:
        """The patients table (soft delete)."""
        return f"bench_{self.run}_patients"

    @property
    def appointments(self) -> str:
        """The appointments table (pseudonymise)."""
        return f"bench_{self.run}_appointments"

    @property
    def labs(self) -> str:
        """The lab results table, found through appointments (pseudonymise)."""
        return f"bench_{self.run}_lab_results"

    @property
    def topic(self) -> str:
        """The compacted Kafka topic keyed by subject."""
        return f"bench-{self.run}-profile"

    @property
    def redis_prefix(self) -> str:
        """The prefix of every Redis key this run writes."""
        return f"bench:{self.run}"

    @property
    def email_hash(self) -> str:
        """The shared Redis hash from e-mail address to subject."""
        return f"{self.redis_prefix}:patients:by-email"

    @property
    def store_database(self) -> str:
        """The PostgreSQL database of this run's Lethe store."""
        return f"lethe_bench_{self.run}"

    @property
    def backup_container(self) -> str:
        """The (empty) Azurite container of the deferred backup step."""
        return f"bench-{self.run}-exports"

    @property
    def log_container(self) -> str:
        """The (empty) Azurite container of the deferred log step."""
        return f"bench-{self.run}-logs"

    def subject_id(self, index: int) -> str:
        """The id of the `index`th seeded subject."""
        return f"s{self.run}-{index:05d}"


def email_of(subject_id: str) -> str:
    """The synthetic e-mail identity of a seeded subject."""
    return f"{subject_id}@bench.invalid"


def required(name: str) -> str:
    """An environment variable the benchmark needs, or a BenchError saying what to run."""
    value = os.environ.get(name)
    if not value:
        raise BenchError(f"{name} is not set: run `scripts/stack up` (it writes .stack/env)")
    return value


def datamap_document(names: Names) -> dict[str, Any]:
    """A data map with all five kinds of system in this run's region."""
    prefix = names.redis_prefix
    return {
        "version": 1,
        "regions": [names.region],
        "tenants": {TENANT: {"region": names.region}},
        "systems": [
            {
                "name": "patients-db",
                "kind": "sql",
                "region": names.region,
                "connection": "LETHE_STACK_SQL_URL",
                "tables": [
                    {
                        "table": names.patients,
                        "subject_column": "patient_id",
                        "soft_delete_column": "deleted_at",
                        "columns": {
                            "full_name": "user.name",
                            "email": "user.contact.email",
                            "phone": "user.contact.phone_number",
                            "date_of_birth": "user.demographic.date_of_birth",
                            "mrn": "user.health_and_medical.record_id",
                        },
                    },
                    {
                        "table": names.appointments,
                        "subject_column": "patient_id",
                        "columns": {"notes": "user.health_and_medical.encounter"},
                    },
                    {
                        "table": names.labs,
                        "subject_column": "patient_id",
                        "via": [
                            {
                                "column": "appointment_id",
                                "table": names.appointments,
                                "references": "id",
                            }
                        ],
                        "columns": {"result": "user.health_and_medical.lab_result"},
                    },
                ],
            },
            {
                "name": "patient-events",
                "kind": "kafka",
                "region": names.region,
                "connection": "LETHE_STACK_KAFKA_BOOTSTRAP",
                "topics": [
                    {
                        "topic": names.topic,
                        "key_template": "patient:{subject_id}",
                        "categories": ["user.contact", "user.name"],
                    }
                ],
            },
            {
                "name": "session-cache",
                "kind": "redis",
                "region": names.region,
                "connection": "LETHE_STACK_REDIS_URL",
                "keys": [
                    {
                        "patterns": [
                            f"{prefix}:patient:{{subject_id}}:*",
                            f"{prefix}:session:{{subject_id}}",
                        ],
                        "hash_fields": [{"key": names.email_hash, "field": "{identity.email}"}],
                        "categories": ["user.contact", "user.account"],
                    }
                ],
            },
            {
                "name": "backups",
                "kind": "blob",
                "region": names.region,
                "connection": "LETHE_STACK_BLOB_CONNECTION",
                "backups": [
                    {
                        "container": names.backup_container,
                        "subject_tag": "subject_ref",
                        "categories": ["user"],
                    }
                ],
            },
            {
                "name": "app-logs",
                "kind": "logs",
                "region": names.region,
                "connection": "LETHE_STACK_BLOB_CONNECTION",
                "logs": [
                    {
                        "container": names.log_container,
                        "prefix": "portal/",
                        "fields": {"patient_id": "subject_id", "email": "identity.email"},
                        "categories": ["user.contact", "user.unique_id"],
                    }
                ],
            },
        ],
    }


def policy_document() -> dict[str, Any]:
    """The GDPR pack's erasure rules, without approval, with a window the run never reaches."""
    return {
        "name": "bench",
        "version": "1",
        "description": "GDPR erasure rules for the benchmark: no approval, a 365-day window.",
        "erasure": {
            "default": {"strategy": "delete", "citation": "GDPR Art. 17(1)"},
            "approval": {"always": False, "special_category": False},
            "deadline_months": 1,
            "max_extension_months": 2,
            "window_days": 365,
            "rules": [
                {
                    "id": "bench.identity.soft-delete",
                    "category": "user.name",
                    "strategy": "soft_delete",
                    "citation": "GDPR Art. 17(1)",
                },
                {
                    "id": "bench.contact.soft-delete",
                    "category": "user.contact",
                    "strategy": "soft_delete",
                    "citation": "GDPR Art. 17(1)",
                },
                {
                    "id": "bench.health.pseudonymise",
                    "category": "user.health_and_medical",
                    "strategy": "pseudonymize",
                    "exception": "GDPR Art. 17(3)(c): public health (Art. 9(2)(h),(i))",
                    "citation": "GDPR Art. 4(5); Art. 17(3)(c)",
                },
            ],
        },
    }


def request_for(subject_id: str) -> ErasureRequest:
    """The erasure request of one seeded subject."""
    return ErasureRequest(
        subject=Subject(
            tenant=TENANT, subject_id=subject_id, identities={"email": email_of(subject_id)}
        ),
        requested_by="bench",
        reason="benchmark",
    )


def check_plan(datamap: Path, pack: Path, names: Names) -> int:
    """Plan one request in-process: no approval, sql/kafka/redis now, blob/logs deferred.

    Returns the number of immediate steps, which the orchestration floor's child runs.
    """
    planner = Planner.from_files(datamap, pack)
    plan = planner.plan(request_for(names.subject_id(0)), "req-bench", "0" * 64)
    immediate = {step.kind for step in plan.steps if step.phase == "immediate"}
    deferred = {step.kind for step in plan.steps if step.phase == "deferred"}
    if plan.approval_required or immediate != {"sql", "kafka", "redis"}:
        raise BenchError(f"unexpected plan: approval {plan.approval_required}, now {immediate}")
    if deferred != {"blob", "logs"}:
        raise BenchError(f"unexpected plan: deferred {deferred}")
    return sum(1 for step in plan.steps if step.phase == "immediate")


# --- seeding and the raw floor ---------------------------------------------------------------


@dataclass(frozen=True)
class SqlTables:
    """This run's three tables, declared (the floor does not reflect them)."""

    metadata: MetaData
    patients: Table
    appointments: Table
    labs: Table

    @classmethod
    def declare(cls, names: Names) -> SqlTables:
        """Declare the tables; every personal column is nullable, so erasure clears to NULL."""
        metadata = MetaData()
        patients = Table(
            names.patients,
            metadata,
            Column("patient_id", String(64), primary_key=True),
            Column("full_name", Text),
            Column("email", Text),
            Column("phone", Text),
            Column("date_of_birth", Date),
            Column("mrn", Text),
            Column("deleted_at", DateTime(timezone=True)),
        )
        appointments = Table(
            names.appointments,
            metadata,
            Column("id", BigInteger, primary_key=True, autoincrement=False),
            Column("patient_id", String(64), nullable=False, index=True),
            Column("notes", Text),
        )
        labs = Table(
            names.labs,
            metadata,
            Column("id", BigInteger, primary_key=True, autoincrement=False),
            Column("appointment_id", BigInteger, nullable=False, index=True),
            Column("result", Text),
        )
        return cls(metadata, patients, appointments, labs)

    def erase_statements(self, subject_id: str, now: datetime) -> list[Update]:
        """The UPDATEs the SQL connector issues for one subject, one per table."""
        patients, appointments, labs = self.patients, self.appointments, self.labs
        deleted_at = patients.c.deleted_at
        path = appointments.alias("lethe_path_1")
        return [
            update(patients)
            .where(patients.c.patient_id == subject_id)
            .values(
                full_name=None,
                email=None,
                phone=None,
                date_of_birth=None,
                mrn=None,
                deleted_at=func.coalesce(deleted_at, literal(now, deleted_at.type)),
            ),
            update(appointments).where(appointments.c.patient_id == subject_id).values(notes=None),
            update(labs)
            .where(
                labs.c.appointment_id.in_(select(path.c.id).where(path.c.patient_id == subject_id))
            )
            .values(result=None),
        ]


def _chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def seed_sql(engine: AsyncEngine, tables: SqlTables, subjects: list[str]) -> None:
    """Create the tables; two appointments and two lab results per subject and filler patient."""
    patients: list[dict[str, object]] = []
    appointments: list[dict[str, object]] = []
    labs: list[dict[str, object]] = []
    for index, subject_id in enumerate(subjects):
        patients.append(
            {
                "patient_id": subject_id,
                "full_name": f"Patient {index}",
                "email": email_of(subject_id),
                "phone": f"+44 20 7946 {index % 10000:04d}",
                "date_of_birth": date(1950 + index % 50, 1 + index % 12, 1 + index % 28),
                "mrn": f"MRN{index:08d}",
                "deleted_at": None,
            }
        )
        for visit in range(2):
            appointment_id = index * 2 + visit + 1
            appointments.append(
                {"id": appointment_id, "patient_id": subject_id, "notes": f"visit {visit}"}
            )
            labs.append({"id": appointment_id, "appointment_id": appointment_id, "result": "ok"})
    async with engine.begin() as conn:
        await conn.run_sync(tables.metadata.create_all)
        for table, rows in (
            (tables.patients, patients),
            (tables.appointments, appointments),
            (tables.labs, labs),
        ):
            for chunk in _chunks(rows, 1000):
                await conn.execute(insert(table), list(chunk))
        for table in (tables.patients, tables.appointments, tables.labs):
            await conn.execute(text(f'ANALYZE "{table.name}"'))


async def seed_redis(redis: Redis, names: Names, subjects: list[str]) -> None:
    """Two patient keys, a session key and an e-mail hash field per subject and filler."""
    for chunk in _chunks(subjects, 500):
        pipe = redis.pipeline(transaction=False)
        for subject_id in chunk:
            pipe.set(f"{names.redis_prefix}:patient:{subject_id}:profile", "{}")
            pipe.set(f"{names.redis_prefix}:patient:{subject_id}:prefs", "{}")
            pipe.set(f"{names.redis_prefix}:session:{subject_id}", "token")
            pipe.hset(names.email_hash, email_of(subject_id), subject_id)
        await pipe.execute()


def producer_for(bootstrap: str) -> Producer:
    """A producer with the Kafka connector's settings (idempotent, acks=all, murmur2)."""
    return Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "partitioner": "murmur2_random",
            "message.timeout.ms": int(KAFKA_TIMEOUT * 1000),
        }
    )


def seed_kafka(admin: AdminClient, bootstrap: str, names: Names, subjects: list[str]) -> None:
    """Create the compacted topic and one profile record per subject (blocking)."""
    config = {"cleanup.policy": "compact", "max.compaction.lag.ms": "86400000"}
    admin.create_topics([NewTopic(names.topic, 3, 1, config=config)])[names.topic].result(30)
    deadline = time.monotonic() + 30
    while names.topic not in admin.list_topics(timeout=10).topics:
        if time.monotonic() > deadline:
            raise BenchError(f"topic {names.topic} did not appear")
        time.sleep(0.1)
    producer = producer_for(bootstrap)
    for subject_id in subjects:
        producer.produce(names.topic, key=f"patient:{subject_id}".encode(), value=b"{}")
        producer.poll(0)
    if producer.flush(60) != 0:
        raise BenchError("Kafka did not take the seed records")


class Floor:
    """The same destructive work as Lethe's immediate phase, done directly."""

    def __init__(
        self, engine: AsyncEngine, tables: SqlTables, redis: Redis, producer: Producer, names: Names
    ) -> None:
        """Use these clients; nothing is created per call."""
        self.engine = engine
        self.tables = tables
        self.redis = redis
        self.producer = producer
        self.names = names

    async def erase(self, subject_id: str) -> None:
        """Erase one subject: every table, Redis and the Kafka tombstone, in parallel."""
        now = datetime.now(UTC)
        await asyncio.gather(
            *(self._sql(statement) for statement in self.tables.erase_statements(subject_id, now)),
            self._redis(subject_id),
            asyncio.to_thread(self._tombstone, f"patient:{subject_id}".encode()),
        )

    async def _sql(self, statement: Update) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(statement)

    async def _redis(self, subject_id: str) -> None:
        prefix = self.names.redis_prefix
        cursor = 0
        while True:
            cursor, keys = await self.redis.scan(
                cursor, match=f"{prefix}:patient:{subject_id}:*", count=1000
            )
            if keys:
                await self.redis.unlink(*keys)
            if cursor == 0:
                break
        await self.redis.unlink(f"{prefix}:session:{subject_id}")
        await self.redis.hdel(self.names.email_hash, email_of(subject_id))

    def _tombstone(self, key: bytes) -> None:
        reported = threading.Event()
        errors: list[KafkaError] = []

        def on_delivery(error: KafkaError | None, _: Message) -> None:
            if error is not None:
                errors.append(error)
            reported.set()

        self.producer.produce(self.names.topic, key=key, value=None, on_delivery=on_delivery)
        self.producer.flush(KAFKA_TIMEOUT + 5)
        if not reported.wait(5.0) or errors:
            raise BenchError("a floor tombstone was not delivered")


async def check_floor(floor: Floor, subjects: list[str]) -> None:
    """Every floor subject's patient row is soft-deleted and their Redis keys are gone."""
    patients = floor.tables.patients
    async with floor.engine.connect() as conn:
        left = (
            await conn.execute(
                select(func.count())
                .select_from(patients)
                .where(patients.c.patient_id.in_(subjects), patients.c.deleted_at.is_(None))
            )
        ).scalar_one()
    keys = sum(
        [
            await floor.redis.exists(f"{floor.names.redis_prefix}:session:{subject_id}")
            for subject_id in subjects
        ]
    )
    if left or keys:
        raise BenchError(f"the floor left {left} row(s) and {keys} key(s) of its subjects")


# --- the worker ------------------------------------------------------------------------------


def _open_log(path: Path) -> IO[bytes]:
    return path.open("wb")


async def start_polling(
    what: str, arguments: list[str], env: dict[str, str], log_path: Path, queues: list[str]
) -> asyncio.subprocess.Process:
    """Start a worker process (a Python script and its arguments); wait until it polls `queues`.

    Its output goes to `log_path`; it is ready once the log says `polling <queue>` for each.
    """
    log = _open_log(log_path)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, *arguments, cwd=ROOT, env=env, stdout=log, stderr=log
        )
    finally:
        log.close()
    wanted = [f"polling {queue}" for queue in queues]
    deadline = time.monotonic() + 60
    while True:
        written = await asyncio.to_thread(log_path.read_text, errors="replace")
        if all(line in written for line in wanted):
            return process
        if process.returncode is not None or time.monotonic() > deadline:
            await stop_worker(process)
            raise BenchError(f"{what} did not start; its log ends:\n{written[-2000:]}")
        await asyncio.sleep(0.1)


async def start_worker(
    names: Names, env: dict[str, str], log_path: Path
) -> asyncio.subprocess.Process:
    """Start `worker.py --region <run region> --control` and wait until both queues are polled."""
    return await start_polling(
        "the worker",
        [str(ROOT / "worker.py"), "--region", names.region, "--control"],
        env,
        log_path,
        [task_queue(names.region, names.control_queue), names.control_queue],
    )


async def start_floor_worker(
    names: Names, address: str, namespace: str, env: dict[str, str], log_path: Path
) -> asyncio.subprocess.Process:
    """Start `orchestration_floor.py` on the floor's two queues; wait until both are polled."""
    region_queue = task_queue(names.floor_region, names.floor_control_queue)
    return await start_polling(
        "the orchestration floor's worker",
        [
            str(ROOT / "bench" / "orchestration_floor.py"),
            "--address",
            address,
            "--namespace",
            namespace,
            "--control-queue",
            names.floor_control_queue,
            "--region-queue",
            region_queue,
        ],
        env,
        log_path,
        [region_queue, names.floor_control_queue],
    )


async def stop_worker(process: asyncio.subprocess.Process) -> None:
    """SIGTERM the worker this run started, and kill it if it does not stop in time."""
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), 30)
    except TimeoutError:
        process.kill()
        await process.wait()


# --- following erasures ----------------------------------------------------------------------


def _seconds(event: HistoryEvent) -> float:
    return event.event_time.seconds + event.event_time.nanos / 1e9


def _is_window_timer(event: HistoryEvent) -> bool:
    return (
        event.event_type == EventType.EVENT_TYPE_TIMER_STARTED
        and event.timer_started_event_attributes.start_to_fire_timeout.seconds
        >= WINDOW_TIMER_SECONDS
    )


_CLOSED = {
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED,
}


async def window_timer_at(temporal: TemporalClient, workflow_id: str) -> float:
    """Long-poll a workflow's history until its window timer starts; that event's time."""
    handle = temporal.get_workflow_handle(workflow_id)
    async with asyncio.timeout(WAIT_TIMEOUT):
        async for event in handle.fetch_history_events(wait_new_event=True):
            if _is_window_timer(event):
                return _seconds(event)
            if event.event_type in _CLOSED:
                break
    raise BenchError(f"{workflow_id} closed before its immediate phase finished")


def check_status(workflow_id: str, status: ErasureStatus) -> None:
    """Every immediate step finished well; otherwise the run is invalid."""
    if status.state != "waiting_window":
        raise BenchError(f"{workflow_id} is {status.state}, not waiting_window")
    bad = [
        f"{step.step_id}: {step.status} {step.detail}"
        for step in status.steps
        if step.phase == "immediate" and step.status not in FINISHED
    ]
    if bad:
        raise BenchError(f"{workflow_id} has unfinished immediate steps: " + "; ".join(bad))


async def poll_until_waiting(client: Client, workflow_id: str, interval: float) -> float:
    """Query the status every `interval` s; the wall-clock time of the first `waiting_window`."""
    deadline = time.monotonic() + WAIT_TIMEOUT
    while time.monotonic() < deadline:
        try:
            status = await client.status(workflow_id)
        except LetheError:
            status = None  # not started yet, or its first workflow task is still running
        seen = time.time()
        if status is not None and status.state == "waiting_window":
            check_status(workflow_id, status)
            return seen
        if status is not None and status.state not in ("planning", "erasing"):
            check_status(workflow_id, status)
        await asyncio.sleep(interval)
    raise BenchError(f"{workflow_id} did not reach waiting_window in {WAIT_TIMEOUT:.0f} s")


@dataclass
class Sample:
    """One erasure request as the benchmark saw it."""

    workflow_id: str
    called_at: float
    """Wall clock just before `Client.erase()`."""
    polled_at: float | None = None
    """Wall clock of the first status query answering `waiting_window` (latency run only)."""
    timer_at: float | None = None
    """Event time of the window timer: the immediate phase is over (orchestration floor: the
    event time of the parent's completion, the point where Lethe starts its window timer)."""

    @property
    def finished_at(self) -> float:
        """The window timer's (orchestration floor: the completion's) event time."""
        if self.timer_at is None:
            raise BenchError(f"{self.workflow_id} has no window timer yet")
        return self.timer_at

    @property
    def latency(self) -> float:
        """From the `erase()` call to the window timer, in seconds."""
        return self.finished_at - self.called_at


async def gather_limited(limit: int, work: Iterable[Awaitable[T]]) -> list[T]:
    """Await every item, at most `limit` at a time, in order."""
    gate = asyncio.Semaphore(limit)

    async def one(item: Awaitable[T]) -> T:
        async with gate:
            return await item

    return list(await asyncio.gather(*(one(item) for item in work)))


async def lethe_latency(client: Client, subjects: list[str], poll_ms: float) -> list[Sample]:
    """Erase the subjects one after another; each waits for its immediate phase.

    With `poll_ms` 0 the wait is a long poll of the history alone, and the status is checked
    once afterwards, so no query competes with the workflow for the worker.
    """
    samples = []
    for subject_id in subjects:
        request = request_for(subject_id)
        called = time.time()
        workflow_id = (await client.erase(request)).workflow_id
        sample = Sample(workflow_id, called)
        if poll_ms > 0:
            sample.polled_at = await poll_until_waiting(client, workflow_id, poll_ms / 1000)
        else:
            sample.timer_at = await window_timer_at(client.temporal, workflow_id)
            check_status(workflow_id, await client.status(workflow_id))
        samples.append(sample)
    timers = await gather_limited(
        10, (window_timer_at(client.temporal, s.workflow_id) for s in samples)
    )
    for sample, timer in zip(samples, timers, strict=True):
        sample.timer_at = timer
    return samples


async def lethe_throughput(client: Client, subjects: list[str]) -> tuple[float, list[Sample]]:
    """Start every erasure at once; the first call's time and each request's sample."""
    requests = [request_for(subject_id) for subject_id in subjects]
    first = time.time()

    async def start(request: ErasureRequest) -> Sample:
        called = time.time()
        return Sample((await client.erase(request)).workflow_id, called)

    samples = list(await asyncio.gather(*(start(request) for request in requests)))
    timers = await asyncio.gather(
        *(window_timer_at(client.temporal, s.workflow_id) for s in samples)
    )
    for sample, timer in zip(samples, timers, strict=True):
        sample.timer_at = timer
    statuses = await gather_limited(10, (client.status(s.workflow_id) for s in samples))
    for sample, status in zip(samples, statuses, strict=True):
        check_status(sample.workflow_id, status)
    return first, samples


# --- the orchestration floor -----------------------------------------------------------------

FLOOR_WORKFLOW = "FloorErasureWorkflow"
"""The orchestration floor's parent workflow type (`bench/orchestration_floor.py`, which runs as
a worker process of its own and is known here only by this name and its input's fields)."""


async def completed_at(temporal: TemporalClient, workflow_id: str) -> float:
    """Long-poll a workflow's history until it completes; the event time of its completion."""
    handle = temporal.get_workflow_handle(workflow_id)
    async with asyncio.timeout(WAIT_TIMEOUT):
        async for event in handle.fetch_history_events(wait_new_event=True):
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED:
                return _seconds(event)
            if event.event_type in _CLOSED:
                break
    raise BenchError(f"{workflow_id} did not complete")


@dataclass(frozen=True)
class OrchestrationFloor:
    """Starts the floor's parent workflows (plain payloads: no codec) and remembers their ids."""

    temporal: TemporalClient
    names: Names
    steps: int
    """Activities in the floor's child: the plan's immediate steps."""
    started: list[str] = field(default_factory=list)

    async def start(self, workflow_id: str) -> Sample:
        """Start one floor erasure; the sample's clock starts just before the call."""
        self.started.append(workflow_id)
        called = time.time()
        await self.temporal.start_workflow(
            FLOOR_WORKFLOW,
            {
                "region_queue": task_queue(self.names.floor_region, self.names.floor_control_queue),
                "steps": self.steps,
            },
            id=workflow_id,
            task_queue=self.names.floor_control_queue,
        )
        return Sample(workflow_id, called)

    async def latency(self, workflow_ids: list[str]) -> list[Sample]:
        """Run floor erasures one after another, each to its completion."""
        samples = []
        for workflow_id in workflow_ids:
            sample = await self.start(workflow_id)
            sample.timer_at = await completed_at(self.temporal, workflow_id)
            samples.append(sample)
        return samples

    async def throughput(self, workflow_ids: list[str]) -> tuple[float, list[Sample]]:
        """Start every floor erasure at once; the first call's time and each one's sample."""
        first = time.time()
        samples = list(await asyncio.gather(*(self.start(w) for w in workflow_ids)))
        completions = await asyncio.gather(
            *(completed_at(self.temporal, s.workflow_id) for s in samples)
        )
        for sample, completion in zip(samples, completions, strict=True):
            sample.timer_at = completion
        return first, samples


# --- where the time goes ---------------------------------------------------------------------


@dataclass
class Timing:
    """One activity or child workflow: scheduled (or initiated), started, closed."""

    name: str
    scheduled: float
    started: float | None = None
    closed: float | None = None

    @property
    def queued(self) -> float:
        """Scheduled to started: waiting for a worker to poll it."""
        return (self.started or self.scheduled) - self.scheduled

    @property
    def ran(self) -> float:
        """Started to closed."""
        return (self.closed or self.scheduled) - (self.started or self.scheduled)

    @property
    def total(self) -> float:
        """Scheduled to closed."""
        return (self.closed or self.scheduled) - self.scheduled


@dataclass
class Breakdown:
    """A workflow's history up to its window timer (or its end), as timings."""

    started: float = 0.0
    ended: float = 0.0
    activities: list[Timing] = field(default_factory=list)
    children: list[Timing] = field(default_factory=list)
    child_ids: list[str] = field(default_factory=list)
    workflow_tasks: int = 0
    signals_in: int = 0
    events: int = 0


def breakdown(events: Sequence[HistoryEvent]) -> Breakdown:
    """The timings of a history's activities and child workflows."""
    found = Breakdown()
    by_id: dict[int, Timing] = {}
    for event in events:
        at, kind = _seconds(event), event.event_type
        if kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            found.started = found.ended = at
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            name = event.activity_task_scheduled_event_attributes.activity_type.name
            by_id[event.event_id] = Timing(name, at)
            found.activities.append(by_id[event.event_id])
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            by_id[event.activity_task_started_event_attributes.scheduled_event_id].started = at
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            by_id[event.activity_task_completed_event_attributes.scheduled_event_id].closed = at
        elif kind == EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED:
            by_id[event.event_id] = Timing("child", at)
            found.children.append(by_id[event.event_id])
        elif kind == EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED:
            attributes = event.child_workflow_execution_started_event_attributes
            by_id[attributes.initiated_event_id].started = at
            found.child_ids.append(attributes.workflow_execution.workflow_id)
        elif kind == EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_COMPLETED:
            attributes_done = event.child_workflow_execution_completed_event_attributes
            by_id[attributes_done.initiated_event_id].closed = at
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
            found.workflow_tasks += 1
        elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            found.signals_in += 1
        found.ended = at
        found.events += 1
        if _is_window_timer(event) or kind in _CLOSED:
            break
    return found


@dataclass
class Segments:
    """Named durations per request, in seconds, in the order first seen."""

    values: dict[str, list[float]] = field(default_factory=dict)
    note: str = ""

    def add(self, name: str, seconds: float) -> None:
        """Record one request's duration for `name`."""
        self.values.setdefault(name, []).append(seconds)


async def histories(
    temporal: TemporalClient, workflow_ids: list[str]
) -> list[Sequence[HistoryEvent]]:
    """The full histories of these workflows, ten fetched at a time."""

    async def fetch(workflow_id: str) -> Sequence[HistoryEvent]:
        history = await temporal.get_workflow_handle(workflow_id).fetch_history()
        return list(history.events)

    return await gather_limited(10, (fetch(workflow_id) for workflow_id in workflow_ids))


async def where_time_goes(
    temporal: TemporalClient,
    samples: list[Sample],
    *,
    call: str = "erase() call",
    end: str = "window timer",
) -> tuple[Segments, Segments, list[str]]:
    """Per request: the parent's segments (they add up) and the child's; the child ids.

    `call` and `end` name where each request's clock starts and stops, for the labels.
    """
    parents = [breakdown(e) for e in await histories(temporal, [s.workflow_id for s in samples])]
    parent_parts, child_parts = Segments(), Segments()
    for sample, found in zip(samples, parents, strict=True):
        parent_parts.add(f"{call} -> workflow started", found.started - sample.called_at)
        accounted = 0.0
        per_name: dict[str, tuple[float, float, int]] = {}
        for timing in found.activities:
            queued, ran, count = per_name.get(timing.name, (0.0, 0.0, 0))
            per_name[timing.name] = (queued + timing.queued, ran + timing.ran, count + 1)
            accounted += timing.total
        for name, (queued, ran, count) in per_name.items():
            parent_parts.add(f"{name} x{count}: queued", queued)
            parent_parts.add(f"{name} x{count}: ran", ran)
        for child in found.children:
            parent_parts.add("regional child: initiated -> started", child.queued)
            parent_parts.add("regional child: started -> parent sees it complete", child.ran)
            accounted += child.total
        parent_parts.add(
            "the rest: workflow-task round trips between them",
            found.ended - found.started - accounted,
        )
        parent_parts.add(f"total ({call} -> {end})", found.ended - sample.called_at)
    child_ids = [child for found in parents for child in found.child_ids]
    children = [breakdown(events) for events in await histories(temporal, child_ids)]
    for found in children:
        for timing in found.activities:
            child_parts.add(f"{timing.name}: queued", timing.queued)
            child_parts.add(f"{timing.name}: ran", timing.ran)
        child_parts.add("child workflow: started -> completed", found.ended - found.started)
    parent_parts.note = _counts(parents, "erasure workflow")
    child_parts.note = _counts(children, "regional child")
    return parent_parts, child_parts, child_ids


def _counts(found: list[Breakdown], what: str) -> str:
    if not found:
        return ""
    return (
        f"per {what}: {statistics.fmean(b.events for b in found):.0f} history events, "
        f"{statistics.fmean(b.workflow_tasks for b in found):.0f} workflow tasks, "
        f"{statistics.fmean(len(b.activities) for b in found):.0f} activities, "
        f"{statistics.fmean(b.signals_in for b in found):.0f} signals received"
    )


# --- CPU -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuSample:
    """Clock ticks used so far by the machine and by a few processes (Linux /proc)."""

    busy: int
    total: int
    processes: dict[str, int]


def _process_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def cpu_sample(pids: dict[str, int]) -> CpuSample | None:
    """The machine's busy and total ticks and each process's, or None off Linux."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    ticks = [int(value) for value in first[1:9]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    processes = {name: t for name, pid in pids.items() if (t := _process_ticks(pid)) is not None}
    return CpuSample(busy=sum(ticks) - idle, total=sum(ticks), processes=processes)


class CpuUse(BaseModel):
    """CPU used during one phase: per erasure by each process, and how busy the machine was."""

    ms_per_erasure: dict[str, float]
    machine_busy: float
    """The fraction of all cores' time that was not idle."""
    cores: int


def cpu_use(before: CpuSample | None, after: CpuSample | None, erasures: int) -> CpuUse | None:
    """What the processes used between two samples, per erasure."""
    if before is None or after is None or after.total == before.total:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return CpuUse(
        ms_per_erasure={
            name: (after.processes[name] - start) * 1000 / tick / erasures
            for name, start in before.processes.items()
            if name in after.processes
        },
        machine_busy=(after.busy - before.busy) / (after.total - before.total),
        cores=os.cpu_count() or 1,
    )


def temporal_pid() -> int | None:
    """The stack's Temporal dev server, from the pid file `scripts/stack` writes."""
    path = ROOT / ".stack" / "temporal" / "pid"
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# --- statistics and output -------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile, linearly interpolated between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class Figures(BaseModel):
    """One side of the comparison: latency percentiles (seconds) and throughput (per second)."""

    p50: float
    p95: float
    throughput: float


class Result(BaseModel):
    """What `--json` writes: Lethe, both floors, the targets and whether they are met."""

    requests: int
    concurrent: int
    lethe: Figures
    poll_ms: float
    lethe_polled_p50: float | None
    lethe_polled_p95: float | None
    lethe_p95_under_load: float
    floor: Figures
    orchestration: Figures
    """The orchestration floor: Lethe's workflow shape with no-op activities."""
    orchestration_steps: int
    """Activities in the orchestration floor's child, one per immediate step of the plan."""
    orchestration_p95_under_load: float
    target_p95: float = TARGET_P95
    target_throughput: float = TARGET_RATE
    p95_met: bool
    throughput_met: bool
    throughput_target_above_orchestration: bool
    """The throughput target exceeds the orchestration floor: out of reach for this shape here."""
    cpu_one_at_a_time: CpuUse | None = None
    cpu_at_once: CpuUse | None = None
    cpu_orchestration_one_at_a_time: CpuUse | None = None
    cpu_orchestration_at_once: CpuUse | None = None


def ms(seconds: float) -> str:
    """Seconds as milliseconds, for tables."""
    return f"{seconds * 1000:.1f}"


def cpu_ceiling(use: CpuUse | None) -> float | None:
    """Erasures per second the machine's cores could give at this CPU cost, if nothing else ran."""
    if use is None or not use.ms_per_erasure:
        return None
    return use.cores * 1000 / sum(use.ms_per_erasure.values())


def show_result(result: Result) -> None:
    """The comparison table and the verdict on each target."""
    table = RichTable(
        title="Erasure, immediate phase: Lethe against the raw floor and Temporal's own floor",
        caption=(
            "raw floor: the same data-system work without Temporal; Temporal shape, no work: "
            f"the mandated workflows with no-op activities ({result.orchestration_steps} in "
            "the child)"
        ),
    )
    for heading in (
        "",
        "Lethe",
        "raw floor",
        "Lethe / raw floor",
        "Temporal shape, no work",
        "Lethe / Temporal shape",
    ):
        table.add_column(heading, justify="right" if heading else "left")
    lethe, floor, shape = result.lethe, result.floor, result.orchestration
    for label, attribute in (("latency p50 (ms)", "p50"), ("latency p95 (ms)", "p95")):
        mine, raw, bare = (getattr(f, attribute) for f in (lethe, floor, shape))
        table.add_row(
            label, ms(mine), ms(raw), f"{mine / raw:.1f}x", ms(bare), f"{mine / bare:.1f}x"
        )
    table.add_row(
        f"throughput, {result.concurrent} at once (/s)",
        f"{lethe.throughput:.1f}",
        f"{floor.throughput:.1f}",
        f"{lethe.throughput / floor.throughput:.3f}x",
        f"{shape.throughput:.1f}",
        f"{lethe.throughput / shape.throughput:.2f}x",
    )
    console.print(table)
    if result.lethe_polled_p50 is not None and result.lethe_polled_p95 is not None:
        console.print(
            f"status-query view of the latency run (first waiting_window seen, "
            f"{result.poll_ms:g} ms polls): p50 {ms(result.lethe_polled_p50)} ms, "
            f"p95 {ms(result.lethe_polled_p95)} ms"
        )
    console.print(
        f"latency p95 with {result.concurrent} at once: Lethe {ms(result.lethe_p95_under_load)} "
        f"ms, Temporal shape with no work {ms(result.orchestration_p95_under_load)} ms"
    )
    for phase, use in (
        ("Lethe, one at a time", result.cpu_one_at_a_time),
        ("Lethe, at once", result.cpu_at_once),
        ("Temporal shape, one at a time", result.cpu_orchestration_one_at_a_time),
        ("Temporal shape, at once", result.cpu_orchestration_at_once),
    ):
        if use is not None:
            each = ", ".join(f"{name} {value:.0f} ms" for name, value in use.ms_per_erasure.items())
            console.print(
                f"CPU per erasure, {phase}: {each}; machine busy {use.machine_busy:.0%} of "
                f"{use.cores} cores"
            )
    for label, met, measured in (
        (f"immediate phase p95 <= {TARGET_P95:.0f} s", result.p95_met, f"{ms(lethe.p95)} ms"),
        (
            f">= {TARGET_RATE:.0f} erasures per second",
            result.throughput_met,
            f"{lethe.throughput:.1f}/s",
        ),
    ):
        verdict = "[green]met[/green]" if met else "[red]NOT met[/red]"
        console.print(f"target {label}: {verdict} ({measured})")
    share = f"Lethe reaches {lethe.throughput / shape.throughput:.0%} of it"
    ceiling = cpu_ceiling(result.cpu_orchestration_at_once)
    cpu_bound = (
        f"; at its CPU per erasure the {result.cpu_orchestration_at_once.cores} cores give at "
        f"most {ceiling:.1f}/s"
        if ceiling is not None and result.cpu_orchestration_at_once is not None
        else ""
    )
    if result.throughput_target_above_orchestration:
        console.print(
            f"[yellow]the {TARGET_RATE:.0f}/s target is above the orchestration floor "
            f"({shape.throughput:.1f}/s, the mandated workflow shape with no work){cpu_bound}: "
            f"out of reach on this machine for that shape, whatever the activities do; "
            f"{share}[/yellow]"
        )
    else:
        console.print(
            f"the {TARGET_RATE:.0f}/s target is within the orchestration floor "
            f"({shape.throughput:.1f}/s, the mandated workflow shape with no work){cpu_bound}: "
            f"reachable on this machine in principle; {share}"
        )


def show_segments(title: str, segments: Segments, note: str) -> None:
    """A table of named durations: mean, p50, p95 and max in milliseconds."""
    table = RichTable(title=title, caption=f"{note}; {segments.note}" if segments.note else note)
    table.add_column("segment")
    for heading in ("mean ms", "p50 ms", "p95 ms", "max ms"):
        table.add_column(heading, justify="right")
    for name, values in segments.values.items():
        table.add_row(
            name,
            ms(statistics.fmean(values)),
            ms(percentile(values, 50)),
            ms(percentile(values, 95)),
            ms(max(values)),
        )
    console.print(table)


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Created:
    """What this run has made so far, undone in reverse by `cleanup`."""

    undo: list[tuple[str, Callable[[], Awaitable[None]]]] = field(default_factory=list)

    def add(self, what: str, action: Callable[[], Awaitable[None]]) -> None:
        """Remember how to remove `what`."""
        self.undo.append((what, action))

    async def cleanup(self) -> None:
        """Remove everything, newest first; a failure is reported and the rest still runs."""
        for what, action in reversed(self.undo):
            try:
                await action()
            except Exception as exc:
                console.print(f"[yellow]cleanup: could not remove {what}: {exc!r}[/yellow]")
        self.undo.clear()


async def delete_workflows(
    temporal: TemporalClient, queues: list[str], known: list[str], *, keep: bool = False
) -> None:
    """Delete (terminating if running) every workflow of this run's queues; or only terminate.

    Visibility lags behind a workflow's start, so the queues are listed again until a round
    finds nothing new.
    """
    query = " OR ".join(f"TaskQueue = '{queue}'" for queue in queues)
    done: set[str] = set()

    async def delete(workflow_id: str) -> None:
        with contextlib.suppress(Exception):
            if keep:
                await temporal.get_workflow_handle(workflow_id).terminate("benchmark over")
                return
            await temporal.workflow_service.delete_workflow_execution(
                DeleteWorkflowExecutionRequest(
                    namespace=temporal.namespace,
                    workflow_execution=WorkflowExecution(workflow_id=workflow_id),
                )
            )

    found = set(known)
    for _ in range(10):
        async for execution in temporal.list_workflows(query):
            found.add(execution.id)
        fresh = sorted(found - done)
        if not fresh and done:
            return
        await gather_limited(10, (delete(workflow_id) for workflow_id in fresh))
        done.update(fresh)
        await asyncio.sleep(1.0)


async def create_store(names: Names, created: Created) -> str:
    """A store database for this run on the stack's PostgreSQL (or a SQLite file); its URL."""
    url = make_url(required("LETHE_STORE_URL"))
    if not url.get_backend_name().startswith("postgresql"):
        path = Path(tempfile.gettempdir()) / f"{names.store_database}.db"
        created.add("the store file", lambda: asyncio.to_thread(path.unlink, True))
        return f"sqlite+aiosqlite:///{path}"
    admin = create_async_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{names.store_database}"'))

    async def drop() -> None:
        async with admin.connect() as conn:
            await conn.execute(
                text(f'DROP DATABASE IF EXISTS "{names.store_database}" WITH (FORCE)')
            )
        await admin.dispose()

    created.add("the store database", drop)
    return url.set(database=names.store_database).render_as_string(hide_password=False)


async def create_containers(names: Names, connection: str, created: Created) -> None:
    """The deferred steps' containers, empty: preflight refuses a step whose container is gone."""
    containers = [names.backup_container, names.log_container]
    async with BlobServiceClient.from_connection_string(connection) as service:
        for container in containers:
            await service.create_container(container)

    async def drop() -> None:
        async with BlobServiceClient.from_connection_string(connection) as service:
            for container in containers:
                await service.delete_container(container)

    created.add("the blob containers", drop)


async def run(
    requests: int,
    concurrent: int,
    poll_ms: float,
    json_path: Path | None,
    *,
    keep_workflows: bool = False,
) -> Result:
    """Set up, measure Lethe and the floor, show where the time goes, clean up."""
    load_env_file(STACK_ENV)
    names = Names(secrets.token_hex(4))
    sql_url = required("LETHE_STACK_SQL_URL")
    redis_url = required("LETHE_STACK_REDIS_URL")
    bootstrap = required("LETHE_STACK_KAFKA_BOOTSTRAP")
    blob_connection = required("LETHE_STACK_BLOB_CONNECTION")
    required("LETHE_KEYS_MASTER_KEY")
    count = 2 * WARMUP + 2 * requests + 2 * concurrent
    subjects = [names.subject_id(index) for index in range(count)]
    cursor = iter(subjects)
    warm_lethe, warm_floor = ([next(cursor) for _ in range(WARMUP)] for _ in range(2))
    latency_subjects = [next(cursor) for _ in range(requests)]
    floor_subjects = [next(cursor) for _ in range(requests)]
    burst_subjects = [next(cursor) for _ in range(concurrent)]
    floor_burst = [next(cursor) for _ in range(concurrent)]
    filler = [f"f{names.run}-{index:05d}" for index in range(FILLER_PATIENTS)]

    workdir = Path(tempfile.mkdtemp(prefix=f"lethe-bench-{names.run}-"))
    created = Created()
    created.add("the work folder", lambda: _remove_tree(workdir))
    engine = create_async_engine(sql_url)
    tables = SqlTables.declare(names)
    redis = Redis.from_url(redis_url)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        datamap, pack = workdir / "datamap.yaml", workdir / "policy.yaml"
        datamap.write_text(yaml.safe_dump(datamap_document(names), sort_keys=False))
        pack.write_text(yaml.safe_dump(policy_document(), sort_keys=False))
        steps = check_plan(datamap, pack, names)
        console.print(f"run {names.run}: region {names.region}, queue {names.control_queue}")
        store_url = await create_store(names, created)

        async def drop_tables() -> None:
            async with engine.begin() as conn:
                await conn.run_sync(tables.metadata.drop_all)
            await engine.dispose()

        created.add("the tables", drop_tables)
        await seed_sql(engine, tables, subjects + filler)

        async def drop_keys() -> None:
            async for batch in _scan_batches(redis, f"{names.redis_prefix}:*"):
                await redis.unlink(*batch)
            await redis.aclose()

        created.add("the Redis keys", drop_keys)
        await seed_redis(redis, names, subjects + filler)

        async def drop_topic() -> None:
            futures = admin.delete_topics([names.topic], operation_timeout=30)
            await asyncio.to_thread(futures[names.topic].result, 60)

        created.add("the Kafka topic", drop_topic)
        await asyncio.to_thread(seed_kafka, admin, bootstrap, names, subjects)
        await create_containers(names, blob_connection, created)
        console.print(f"seeded {len(subjects)} subjects and {len(filler)} filler patients")

        subject_key = base64.b64encode(secrets.token_bytes(32)).decode()
        os.environ.update(
            LETHE_DATAMAP=str(datamap),
            LETHE_POLICY=str(pack),
            LETHE_CONTROL_QUEUE=names.control_queue,
            LETHE_STORE_URL=store_url,
            LETHE_SUBJECT_KEY=subject_key,
            LETHE_WORKER_SHUTDOWN_GRACE_SECONDS="5",
        )
        settings = load_settings()
        client = Client(await connect(settings), settings)
        started: list[str] = []
        created.add(
            "the workflows",
            lambda: delete_workflows(
                client.temporal,
                [task_queue(names.region, names.control_queue), names.control_queue],
                started,
                keep=keep_workflows,
            ),
        )
        worker = await start_worker(names, dict(os.environ), workdir / "worker.log")
        created.add("the worker", lambda: stop_worker(worker))
        console.print(f"worker pid {worker.pid}; warming up with {WARMUP} erasures")
        for subject_id in warm_lethe:
            started.append(client.workflow_id(TENANT, subject_id))
        await lethe_latency(client, warm_lethe, poll_ms)

        pids = {"worker": worker.pid, "bench (client)": os.getpid()}
        server = temporal_pid()
        if server is not None:
            pids["Temporal dev server (shared)"] = server

        console.print(f"Lethe: {requests} erasures one after another")
        started += [client.workflow_id(TENANT, s) for s in latency_subjects + burst_subjects]
        before = cpu_sample(pids)
        samples = await lethe_latency(client, latency_subjects, poll_ms)
        cpu_sequential = cpu_use(before, cpu_sample(pids), requests)
        console.print(f"Lethe: {concurrent} erasures at once")
        before = cpu_sample(pids)
        first, burst = await lethe_throughput(client, burst_subjects)
        cpu_burst = cpu_use(before, cpu_sample(pids), concurrent)
        lethe_rate = concurrent / (max(s.finished_at for s in burst) - first)

        console.print("floor: the same work without Lethe or Temporal")
        floor = Floor(engine, tables, redis, producer_for(bootstrap), names)
        for subject_id in warm_floor:
            await floor.erase(subject_id)
        floor_times = []
        for subject_id in floor_subjects:
            begun = time.perf_counter()
            await floor.erase(subject_id)
            floor_times.append(time.perf_counter() - begun)
        begun = time.perf_counter()
        await asyncio.gather(*(floor.erase(subject_id) for subject_id in floor_burst))
        floor_rate = concurrent / (time.perf_counter() - begun)
        await check_floor(floor, floor_subjects + floor_burst)

        console.print(
            f"orchestration floor: the same workflow shape with {steps} no-op activities, "
            f"{requests} one after another, {concurrent} at once"
        )
        shape = OrchestrationFloor(
            TemporalClient(client.temporal.service_client, namespace=client.temporal.namespace),
            names,
            steps,
        )
        created.add(
            "the orchestration floor's workflows",
            lambda: delete_workflows(
                shape.temporal,
                [
                    task_queue(names.floor_region, names.floor_control_queue),
                    names.floor_control_queue,
                ],
                shape.started,
                keep=keep_workflows,
            ),
        )
        shape_worker = await start_floor_worker(
            names,
            settings.temporal_address,
            settings.temporal_namespace,
            dict(os.environ),
            workdir / "orchestration_floor.log",
        )
        created.add("the orchestration floor's worker", lambda: stop_worker(shape_worker))
        await shape.latency([f"floor-{names.run}-warmup-{i}" for i in range(WARMUP)])
        shape_pids = {"floor worker": shape_worker.pid, "bench (client)": os.getpid()}
        if server is not None:
            shape_pids["Temporal dev server (shared)"] = server
        before = cpu_sample(shape_pids)
        shape_samples = await shape.latency([f"floor-{names.run}-{i}" for i in range(requests)])
        cpu_shape_sequential = cpu_use(before, cpu_sample(shape_pids), requests)
        before = cpu_sample(shape_pids)
        shape_first, shape_burst = await shape.throughput(
            [f"floor-{names.run}-burst-{i}" for i in range(concurrent)]
        )
        cpu_shape_burst = cpu_use(before, cpu_sample(shape_pids), concurrent)
        shape_rate = concurrent / (max(s.finished_at for s in shape_burst) - shape_first)
        await stop_worker(shape_worker)

        latencies = [s.latency for s in samples]
        shape_latencies = [s.latency for s in shape_samples]
        polled = [s.polled_at - s.called_at for s in samples if s.polled_at is not None]
        lethe_p95 = percentile(latencies, 95)
        result = Result(
            requests=requests,
            concurrent=concurrent,
            lethe=Figures(p50=percentile(latencies, 50), p95=lethe_p95, throughput=lethe_rate),
            poll_ms=poll_ms,
            lethe_polled_p50=percentile(polled, 50) if polled else None,
            lethe_polled_p95=percentile(polled, 95) if polled else None,
            lethe_p95_under_load=percentile([s.latency for s in burst], 95),
            floor=Figures(
                p50=percentile(floor_times, 50),
                p95=percentile(floor_times, 95),
                throughput=floor_rate,
            ),
            orchestration=Figures(
                p50=percentile(shape_latencies, 50),
                p95=percentile(shape_latencies, 95),
                throughput=shape_rate,
            ),
            orchestration_steps=steps,
            orchestration_p95_under_load=percentile([s.latency for s in shape_burst], 95),
            p95_met=lethe_p95 <= TARGET_P95,
            throughput_met=lethe_rate >= TARGET_RATE,
            throughput_target_above_orchestration=shape_rate < TARGET_RATE,
            cpu_one_at_a_time=cpu_sequential,
            cpu_at_once=cpu_burst,
            cpu_orchestration_one_at_a_time=cpu_shape_sequential,
            cpu_orchestration_at_once=cpu_shape_burst,
        )
        for label, group in (("one at a time", samples), (f"{concurrent} at once", burst)):
            parent, child, child_ids = await where_time_goes(client.temporal, group)
            started += child_ids
            show_segments(
                f"Where the time goes, {label}: erasure workflow",
                parent,
                "per request; the rows add up to the total (queued = scheduled -> started)",
            )
            show_segments(
                f"Where the time goes, {label}: regional child workflow",
                child,
                "per step; the steps run in parallel, the slowest sets the child's time",
            )
        parent, child, _ = await where_time_goes(
            shape.temporal, shape_samples, call="start call", end="completed"
        )
        show_segments(
            "Where the time goes, orchestration floor one at a time: parent workflow",
            parent,
            "per request, up to the parent's completion; the rows add up to the total",
        )
        show_segments(
            "Where the time goes, orchestration floor one at a time: child workflow",
            child,
            "per no-op activity; they run in parallel",
        )
        show_result(result)
        if json_path is not None:
            await asyncio.to_thread(json_path.write_text, result.model_dump_json(indent=2))
        return result
    finally:
        await created.cleanup()
        await engine.dispose()


async def _scan_batches(redis: Redis, match: str) -> AsyncIterator[list[bytes | str]]:
    cursor = 0
    while True:
        cursor, keys = await redis.scan(cursor, match=match, count=1000)
        if keys:
            yield keys
        if cursor == 0:
            return


async def _remove_tree(path: Path) -> None:
    def remove() -> None:
        for child in sorted(path.rglob("*"), reverse=True):
            if child.is_dir():
                child.rmdir()
            else:
                child.unlink()
        path.rmdir()

    await asyncio.to_thread(remove)


async def stoppable(work: Awaitable[T]) -> T:
    """Await `work`; SIGINT or SIGTERM cancels it once, so its clean-up still runs."""
    task = asyncio.ensure_future(work)

    def stop() -> None:
        if not task.cancelling():
            task.cancel()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    return await task


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: `python bench/erasure.py [--requests N] [--concurrent N] [--json PATH]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=50, help="sequential requests (50)")
    parser.add_argument("--concurrent", type=int, default=100, help="requests at once (100)")
    parser.add_argument(
        "--poll-ms",
        type=float,
        default=POLL_MS,
        help="status-query interval in the latency run (10); 0: follow the history only",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--keep-workflows",
        action="store_true",
        help="terminate the run's workflows but keep their histories, to study them",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is not met")
    args = parser.parse_args(argv)
    if args.requests < 2 or args.concurrent < 1 or args.poll_ms < 0:
        parser.error("--requests must be at least 2, --concurrent at least 1, --poll-ms >= 0")
    try:
        result = asyncio.run(
            stoppable(
                run(
                    args.requests,
                    args.concurrent,
                    args.poll_ms,
                    args.json,
                    keep_workflows=args.keep_workflows,
                )
            )
        )
    except (BenchError, LetheError) as exc:
        console.print(f"[red]bench: {exc}[/red]")
        return 2
    except asyncio.CancelledError:
        console.print("[yellow]bench: stopped; what the run created is removed[/yellow]")
        return 130
    if args.strict and not (result.p95_met and result.throughput_met):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
