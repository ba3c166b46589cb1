"""A clinic in two regions: erasing an EU patient touches nothing, and tells nothing, in the US.

The sample hospital is seeded twice (examples/seed.py) under one run's names: an EU copy and a
US copy, each in a region of its own (`eu<run>`, `us<run>`), one tenant each, one data map
(tests/e2e/two_regions.datamap.yaml) listing both. The US copy holds patients with the SAME
patient ids (and e-mails) as the EU copy, but of the US tenant: the worst case, where any step
sent to the US by mistake would find "the subject" there. One worker process serves each region
(both also serve the one control queue), each given only its own region's connection variables.

A DPO erases one EU patient through the `lethe` CLI. Before the fix, such a plan had a step in
every system of the map: the member's id and e-mail went to the US worker, which wrote a
tombstone into the US topic, ran SQL against the US tables and deleted the US backups. Now:
the plan has EU steps only; no workflow or activity of the request was ever scheduled on the US
queue (the histories and visibility say so); the US copy is byte-identical afterwards; and the
patient is erased in the EU systems.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

import psycopg
import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client as TemporalClient
from temporalio.client import WorkflowHistory

from lethe.examples.seed import (
    BACKUP_PREFIX,
    BACKUPS_CONTAINER,
    EXPORTS_CONTAINER,
    LOGS_CONTAINER,
    Connections,
    Patient,
    drop_all,
    export_blob_name,
    sample_patients,
    seed_all,
    sql_prefix,
)
from lethe.kernel.regions import task_queue
from tests.conftest import stack_variable
from tests.e2e.conftest import (
    PATIENTS,
    Footprint,
    Hospital,
    WorkerProcess,
    _store_database,
    _terminate_leftovers,
    approve_and_complete,
    certificate_of,
    erase_and_wait_for_approval,
    footprint,
)

HERE = Path(__file__).resolve().parent
SIDES = ("eu", "us")
SYSTEMS = ("patients-db", "patient-events", "session-cache", "backups", "app-logs")
"""The hospital's systems; each region's copy has them with its side as suffix."""
CONNECTIONS = {
    "SQL_URL": "sql_url",
    "KAFKA_BOOTSTRAP": "kafka_bootstrap",
    "REDIS_URL": "redis_url",
    "BLOB_CONNECTION": "blob_connection",
}
"""The connection variables of a region's systems, `CLINIC_<SIDE>_<NAME>`, by Connections field."""
STACK_CONNECTIONS = (
    "LETHE_STACK_SQL_URL",
    "LETHE_STACK_KAFKA_BOOTSTRAP",
    "LETHE_STACK_REDIS_URL",
    "LETHE_STACK_BLOB_CONNECTION",
)
"""The stack's own variables, kept from the workers: each holds only its region's."""


@dataclass
class RegionCopy(Hospital):
    """One region's copy of the sample hospital, in the clinic's one deployment.

    The copies share the run, the control queue, the Lethe store, the data map and the work
    directory; each has its own region, tenant, names and connection variables.
    """

    side: str = "eu"

    @property
    def region(self) -> str:
        """The copy's region, `<side><run>`: its worker polls `lethe-e2e-<run>-<region>`."""
        return f"{self.side}{self.suffix}"

    @property
    def tenant(self) -> str:
        """The copy's tenant, at home in the copy's region."""
        return f"clinic-{self.side}-{self.suffix}"

    @property
    def control_queue(self) -> str:
        """The clinic's one control queue."""
        return f"lethe-e2e-{self.suffix}-control"

    @property
    def prefix(self) -> str:
        """The prefix of the copy's tables, topic, Redis keys and containers."""
        return f"e2e-{self.suffix}-{self.side}-"

    @property
    def queue(self) -> str:
        """The copy's regional task queue."""
        return task_queue(self.region, self.control_queue)

    def system(self, name: str) -> str:
        """The copy's system called `name` in examples/datamap.yaml."""
        return f"{name}-{self.side}"

    @property
    def connection_env(self) -> dict[str, str]:
        """The variables the copy's systems name in the data map, and their values."""
        return {
            f"CLINIC_{self.side.upper()}_{name}": getattr(self.connections, field)
            for name, field in CONNECTIONS.items()
        }

    @property
    def env(self) -> dict[str, str]:
        """The environment of the copy's worker (and CLI): this region's connections only."""
        base = {k: v for k, v in super().env.items() if k not in STACK_CONNECTIONS}
        return base | self.connection_env

    def region_worker(self) -> WorkerProcess:
        """`worker.py --region <region> --control` with the copy's environment (not started)."""
        found = WorkerProcess(self.region, self.env, self.workdir / f"worker-{self.side}.log")
        self.workers.append(found)
        return found


@dataclass(frozen=True)
class Clinic:
    """The two copies, each with its worker running."""

    eu: RegionCopy
    us: RegionCopy


def _us_patients(eu: list[Patient]) -> list[Patient]:
    """Other people, with the EU patients' ids and e-mails: every US locator would match."""
    return [
        dataclasses.replace(other, patient_id=same.patient_id, email=same.email)
        for same, other in zip(eu, sample_patients(len(eu), seed=None), strict=True)
    ]


@pytest.fixture(scope="module")
async def clinic(
    tmp_path_factory: pytest.TempPathFactory,
    stack_temporal: TemporalClient,
    connections: Connections,
) -> AsyncIterator[Clinic]:
    """Both copies seeded, the data map written, a store database, a worker per region."""
    run = uuid.uuid4().hex[:8]
    workdir = tmp_path_factory.mktemp(f"clinic-{run}")
    store_url, admin = _store_database(run)
    database = make_url(store_url).database
    subject_key = base64.b64decode(stack_variable("LETHE_SUBJECT_KEY"))
    eu_patients = [
        dataclasses.replace(p, patient_id=f"pt-{run}-{n}", email=f"patient{n}.{run}@clinic.example")
        for n, p in enumerate(sample_patients(PATIENTS, seed=None), 1)
    ]
    eu, us = (
        RegionCopy(
            suffix=run,
            workdir=workdir,
            connections=connections,
            store_url=store_url,
            subject_key=subject_key,
            patients=patients,
            side=side,
        )
        for side, patients in zip(SIDES, (eu_patients, _us_patients(eu_patients)), strict=True)
    )
    template = Template((HERE / "two_regions.datamap.yaml").read_text())
    eu.datamap.write_text(
        template.substitute(
            {
                f"{copy.side}_{name}": value
                for copy in (eu, us)
                for name, value in (
                    ("region", copy.region),
                    ("tenant", copy.tenant),
                    ("prefix", copy.prefix),
                    ("sql", sql_prefix(copy.prefix)),
                )
            }
        )
    )
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
        await conn.execute(f'CREATE DATABASE "{database}"')
    try:
        placed = await asyncio.gather(
            *(
                seed_all(
                    connections,
                    copy.patients,
                    copy.prefix,
                    subject_key=subject_key,
                    tenant=copy.tenant,
                )
                for copy in (eu, us)
            )
        )
        eu.kafka_placed, us.kafka_placed = placed
        await asyncio.gather(eu.region_worker().start(), us.region_worker().start())
        yield Clinic(eu=eu, us=us)
    finally:
        for copy in (eu, us):
            for worker in copy.workers:
                await worker.stop()
        for copy in (eu, us):
            await _terminate_leftovers(copy)
        dropped = await asyncio.gather(
            *(drop_all(connections, copy.prefix) for copy in (eu, us)), return_exceptions=True
        )
        async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
            await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        for error in dropped:
            if isinstance(error, BaseException):
                raise error


async def test_an_eu_erasure_runs_in_the_eu_only_and_leaves_the_us_copy_untouched(
    clinic: Clinic,
) -> None:
    eu, us = clinic.eu, clinic.us
    ada = eu.patients[0]
    assert ada.patient_id == us.patients[0].patient_id  # the US holds "her" id too
    eu_before, us_before = await asyncio.gather(footprint(eu), footprint(us))
    assert ada.patient_id.encode() in b"".join(us_before.blobs.values())  # the worst case

    # The US worker is up and would run whatever reached its queue (a health check round trip,
    # the only workflow this test puts there).
    pinged, workflow_id = await asyncio.gather(
        eu.lethe("ping", "--region", us.region, "--timeout", "30"),
        erase_and_wait_for_approval(eu, ada),
    )
    assert pinged.code == 0, str(pinged)
    assert us.queue in pinged.stdout

    await approve_and_complete(eu, workflow_id)
    await eu.wait_listed(workflow_id, "completed")  # visibility trails the workflow
    certificate, eu_after, us_after = await asyncio.gather(
        certificate_of(eu, workflow_id), footprint(eu), footprint(us)
    )

    # 1. The plan: the EU systems, every one of them, and nothing else.
    plan = certificate["plan"]
    assert plan["tenant"] == eu.tenant and plan["home_region"] == eu.region
    assert [r["region"] for r in plan["regions"]] == [eu.region], plan["regions"]
    steps = [step for r in plan["regions"] for step in r["steps"]]
    assert {step["region"] for step in steps} == {eu.region}
    assert {step["system"] for step in steps} == {eu.system(name) for name in SYSTEMS}
    assert {o["step_id"] for o in certificate["steps"]} == {step["id"] for step in steps}

    # 2. Nothing of the request was scheduled on the US queue.
    await _check_queues(eu, us, workflow_id)

    # 3. The US copy, read with each system's own client, is exactly as seeded.
    _assert_same(us_before, us_after)

    # 4. The EU patient is erased in the EU systems.
    outcomes = {o["step_id"]: o for o in certificate["steps"]}
    await _check_eu_erased(eu, ada, eu_before, eu_after, outcomes)


def _assert_same(before: Footprint, after: Footprint) -> None:
    """Each system's part of a footprint is unchanged, compared one by one for a clear diff."""
    assert after.sql == before.sql
    assert after.redis == before.redis
    assert after.kafka == before.kafka
    assert after.blobs == before.blobs
    assert after.tags == before.tags
    assert after == before


async def _histories(temporal: TemporalClient, workflow_id: str) -> dict[str, WorkflowHistory]:
    """The history of the workflow and of every child it started, all the way down, by id."""
    found: dict[str, WorkflowHistory] = {}
    pending: list[tuple[str, str | None]] = [(workflow_id, None)]
    while pending:
        wid, run_id = pending.pop()
        history = await temporal.get_workflow_handle(wid, run_id=run_id).fetch_history()
        found[wid] = history
        for event in history.events:
            if event.event_type == EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED:
                child = event.child_workflow_execution_started_event_attributes.workflow_execution
                pending.append((child.workflow_id, child.run_id))
    return found


def _scheduled_queues(history: WorkflowHistory) -> list[tuple[str, str]]:
    """(what, task queue) of every child workflow and activity the history scheduled."""
    scheduled = []
    for event in history.events:
        if event.event_type == EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED:
            child = event.start_child_workflow_execution_initiated_event_attributes
            scheduled.append((f"child {child.workflow_id}", child.task_queue.name))
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            activity = event.activity_task_scheduled_event_attributes
            scheduled.append((f"activity {activity.activity_type.name}", activity.task_queue.name))
    return scheduled


async def _check_queues(eu: RegionCopy, us: RegionCopy, workflow_id: str) -> None:
    """The histories of the request and its children schedule nothing on the US queue, and
    visibility lists nothing on it but the health check."""
    temporal = (await eu.sdk()).temporal
    histories = await _histories(temporal, workflow_id)
    scheduled = {wid: _scheduled_queues(history) for wid, history in histories.items()}
    on_us = {wid: [s for s in found if s[1] == us.queue] for wid, found in scheduled.items()}
    assert not any(on_us.values()), on_us
    # Not vacuous: the request's regional work (preflight, steps) was scheduled from its own
    # history, on the EU queue; its own work (planning, ledger) ran as local activities.
    queues = {queue for found in scheduled.values() for _, queue in found}
    assert eu.queue in queues and queues <= {eu.queue, eu.control_queue}, scheduled
    mine = scheduled[workflow_id]
    assert ("activity region.preflight", eu.queue) in mine, mine
    assert ("activity sql.erase", eu.queue) in mine, mine

    # Visibility: the US queue holds nothing but the health check.
    async def listed(queue: str) -> list[tuple[str, str | None]]:
        query = f"TaskQueue = '{queue}'"
        return [(w.id, w.workflow_type) async for w in temporal.list_workflows(query)]

    on_us_queue = await listed(us.queue)
    assert not [wid for wid, _ in on_us_queue if wid.startswith(workflow_id)], on_us_queue
    assert [w for w in on_us_queue if w[1] != "HealthCheckWorkflow"] == [], on_us_queue


async def _check_eu_erased(
    eu: RegionCopy,
    ada: Patient,
    before: Footprint,
    after: Footprint,
    outcomes: dict[str, Any],
) -> None:
    """Her row soft-deleted, a tombstone for her key, her Redis keys gone, her export and the
    whole backups taken before the erasure gone; the other EU patients' rows as seeded."""
    patients, *_ = eu.tables()
    engine = create_async_engine(eu.connections.sql_url)
    try:
        async with engine.connect() as conn:
            row = (
                await conn.execute(select(patients).where(patients.c.patient_id == ada.patient_id))
            ).one()
    finally:
        await engine.dispose()
    assert row.deleted_at is not None
    assert ada.email not in (row.full_name, row.email)
    assert outcomes[f"{eu.system('patients-db')}/0"]["affected"] == 1
    others = [r for r in before.sql[patients.name] if r[0] != ada.patient_id]
    assert others == [r for r in after.sql[patients.name] if r[0] != ada.patient_id]

    key = f"patient:{ada.patient_id}".encode()
    new = [r for r in after.kafka if r not in before.kafka]
    evidence = outcomes[f"{eu.system('patient-events')}/0"]["evidence"]
    assert evidence["topic"] == eu.topic
    assert new == [(evidence["partition"], evidence["offset"], key, None)]
    assert evidence["partition"] == eu.kafka_placed[ada.patient_id][0]

    hers = {
        f"{eu.prefix}patient:{ada.patient_id}:profile",
        f"{eu.prefix}patient:{ada.patient_id}:visits",
        f"{eu.prefix}session:{ada.patient_id}",
    }
    assert hers <= set(before.redis)
    assert not hers & set(after.redis)
    index = f"{eu.prefix}patients:by-email"
    assert ada.email in before.redis[index] and ada.email not in after.redis[index]

    export = f"{EXPORTS_CONTAINER}/{export_blob_name(eu.ref(ada))}"
    assert export in before.blobs and export not in after.blobs
    backups = f"{BACKUPS_CONTAINER}/{BACKUP_PREFIX}"
    assert [k for k in before.blobs if k.startswith(backups)]
    assert not [k for k in after.blobs if k.startswith(backups)]
    logs = b"".join(v for k, v in after.blobs.items() if k.startswith(f"{LOGS_CONTAINER}/"))
    assert logs and ada.patient_id.encode() not in logs and ada.email.encode() not in logs
