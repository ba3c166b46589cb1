"""The SQL connector's batch erasure against the stack's PostgreSQL: hundreds of subjects in
one transaction, one statement per table, for each action and through a join path.

Every test gets its own schema holding a ward (patients, appointments, lab results) of two
tenants that share subject ids. A batch erases some subjects of one tenant; every other row (the
rest of the tenant's subjects, and the other tenant's subjects of the same ids) stays
byte-identical, checked with an md5 of each row's text before and after.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import (
    CHAR,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    event,
    insert,
    select,
    text,
)
from sqlalchemy.engine.interfaces import CacheStats
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.schema import CreateSchema, DropSchema
from temporalio import activity, workflow
from temporalio.client import Client as TemporalClient
from temporalio.common import RetryPolicy
from temporalio.testing import ActivityEnvironment
from temporalio.worker import Worker

from lethe.activities.attempts import kept_alive
from lethe.activities.connectors import Connectors
from lethe.activities.sql import SqlEraser, one_batch
from lethe.classification.datamap import SqlTableLocator
from lethe.contracts import Action, BatchStepOutcome, BatchStepRequest, BulkSubject, Subject
from tests.steps import decision, step, step_request

TENANT, OTHER = "st-mary", "st-jude"
SYSTEM = "patients-db"
ODD = "x' OR '1'='1"
"""An injection-shaped id: a subject of the batch with no rows, matched as data."""
SUBJECTS = 400
"""Subjects of each tenant with rows: ids p-0000 ... p-0399."""
IN_BATCH = 300
"""The batch holds the first IN_BATCH of them (and a few without rows)."""

Checksums = dict[str, dict[int, str]]


def sid(n: int) -> str:
    """The id of subject `n`."""
    return f"p-{n:04d}"


@dataclass
class Ward:
    """One test's schema and its tables."""

    engine: AsyncEngine
    schema: str
    metadata: MetaData

    def name(self, table: str) -> str:
        """The schema-qualified name the data map uses."""
        return f"{self.schema}.{table}"

    def table(self, table: str) -> Table:
        """A table of the ward."""
        return self.metadata.tables[self.name(table)]

    async def checksums(self) -> Checksums:
        """Per table, each row's md5 of its text, by primary key."""
        sums: Checksums = {}
        async with self.engine.connect() as conn:
            for name in ("patients", "appointments", "lab_results"):
                rows = await conn.execute(
                    text(f"SELECT id, md5(CAST(t AS text)) FROM {self.name(name)} AS t")
                )
                sums[name] = {int(row[0]): str(row[1]) for row in rows}
        return sums

    async def rows(self, table: str) -> dict[int, dict[str, Any]]:
        """A table's rows by primary key, as dicts."""
        async with self.engine.connect() as conn:
            result = await conn.execute(select(self.table(table)))
            return {row.id: dict(row._mapping) for row in result}


def _patient_id(tenant: str, n: int) -> int:
    return n if tenant == TENANT else 10_000 + n


@pytest.fixture
async def ward(sql_url: str) -> AsyncIterator[Ward]:
    """A fresh schema: per tenant SUBJECTS patients, two appointments each with a lab result."""
    schema = f"lethe_b_{uuid.uuid4().hex[:12]}"
    metadata = MetaData(schema=schema)
    patients = Table(
        "patients",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("tenant", String(20), nullable=False),
        Column("patient_id", String(40), nullable=False),
        Column("full_name", String(200), nullable=False),
        Column("email", String(200)),
        Column("deleted_at", DateTime(timezone=True)),
        UniqueConstraint("tenant", "patient_id"),
    )
    appointments = Table(
        "appointments",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("tenant", String(20), nullable=False),
        Column("patient_id", String(40), nullable=False),
        Column("notes", Text),
    )
    lab_results = Table(
        "lab_results",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("appointment_id", Integer, ForeignKey(appointments.c.id)),
        Column("result", Text, nullable=False),
    )
    engine = create_async_engine(sql_url)
    people, visits, results = [], [], []
    for tenant in (TENANT, OTHER):
        for n in range(SUBJECTS):
            key = _patient_id(tenant, n)
            people.append(
                {
                    "id": key,
                    "tenant": tenant,
                    "patient_id": sid(n),
                    "full_name": f"Patient {tenant} {n}",
                    "email": f"{n}@{tenant}.example",
                }
            )
            for visit in (0, 1):
                visits.append(
                    {
                        "id": key * 2 + visit,
                        "tenant": tenant,
                        "patient_id": sid(n),
                        "notes": f"visit {visit}",
                    }
                )
                results.append(
                    {"id": key * 2 + visit, "appointment_id": key * 2 + visit, "result": f"r{n}"}
                )
    async with engine.begin() as conn:
        await conn.execute(CreateSchema(schema))
        await conn.run_sync(metadata.create_all)
        await conn.execute(insert(patients), people)
        await conn.execute(insert(appointments), visits)
        await conn.execute(insert(lab_results), results)
    try:
        yield Ward(engine=engine, schema=schema, metadata=metadata)
    finally:
        async with engine.begin() as conn:
            await conn.execute(DropSchema(schema, cascade=True, if_exists=True))
        await engine.dispose()


def patients_locator(ward: Ward) -> SqlTableLocator:
    """Patients, by (tenant, patient_id)."""
    return SqlTableLocator(
        table=ward.name("patients"),
        subject_column="patient_id",
        tenant_column="tenant",
        soft_delete_column="deleted_at",
        columns={"full_name": "user.name", "email": "user.contact.email"},
    )


def lab_results_locator(ward: Ward) -> SqlTableLocator:
    """Lab results, found through the subject's appointments (tenant on the appointment)."""
    return SqlTableLocator.model_validate(
        {
            "table": ward.name("lab_results"),
            "subject_column": "patient_id",
            "tenant_column": "tenant",
            "via": [
                {"column": "appointment_id", "table": ward.name("appointments"), "references": "id"}
            ],
            "columns": {"result": "user.health_and_medical.lab_result"},
        }
    )


def batch_of(
    locator: SqlTableLocator,
    action: Action,
    ids: list[str],
    *,
    tenant: str = TENANT,
    connection: str = "LETHE_STACK_SQL_URL",
) -> BatchStepRequest:
    """A batch step request for `ids` of `tenant`, each under its own reference."""
    one = step_request(
        step(
            locator,
            action=action,
            system=SYSTEM,
            connection=connection,
            decisions=[decision(action, rule="test.rule")],
        )
    )
    return BatchStepRequest(
        request_id=f"bulk-{uuid.uuid4().hex[:8]}",
        batch=0,
        step=one.step,
        subjects=[
            BulkSubject(
                subject_ref=f"ref-{n}-{uuid.uuid4().hex[:6]}",
                subject=Subject(tenant=tenant, subject_id=subject_id),
            )
            for n, subject_id in enumerate(ids)
        ],
        erasure_started_at=one.erasure_started_at,
        window_ends_at=one.window_ends_at,
    )


BATCH_IDS = [sid(n) for n in range(IN_BATCH)] + ["p-9998", ODD, "p-9999"]
"""The batch: IN_BATCH subjects with rows, then two without and an injection-shaped id."""


def _keys_of(ward_table: str, n: int) -> list[int]:
    """The primary keys of subject `n`'s rows of tenant TENANT in a table."""
    key = _patient_id(TENANT, n)
    return [key] if ward_table == "patients" else [key * 2, key * 2 + 1]


def _assert_no_subject_id(outcome: BatchStepOutcome, ids: list[str]) -> None:
    dumped = outcome.model_dump_json()
    assert all(f'"{subject_id}"' not in dumped for subject_id in ids)
    assert ODD not in dumped


CASES: list[tuple[Action, str]] = [
    ("delete", "patients"),
    ("soft_delete", "patients"),
    ("pseudonymize", "patients"),
    ("anonymize", "patients"),
    ("delete", "lab_results"),
    ("pseudonymize", "lab_results"),
    ("anonymize", "lab_results"),
]


def _locator(ward: Ward, table: str) -> SqlTableLocator:
    return patients_locator(ward) if table == "patients" else lab_results_locator(ward)


def _assert_erased(action: Action, table: str, row: dict[str, Any] | None) -> None:
    """A batch subject's row as the action leaves it."""
    if action == "delete":
        assert row is None
        return
    assert row is not None
    if table == "patients":
        assert (row["full_name"], row["email"]) == ("erased", None)
        assert (row["deleted_at"] is not None) is (action == "soft_delete")
        if action == "anonymize":
            assert row["patient_id"].startswith("anon-")
    else:
        assert row["result"] == "erased"
        assert (row["appointment_id"] is None) is (action == "anonymize")


@pytest.mark.parametrize(("action", "table"), CASES)
async def test_a_batch_erases_its_subjects_and_nothing_else(
    ward: Ward, action: Action, table: str
) -> None:
    before = await ward.checksums()
    batch = batch_of(_locator(ward, table), action, BATCH_IDS)
    outcome = await SqlEraser(ward.engine).erase_batch(batch)

    per_subject = 1 if table == "patients" else 2
    assert [o.subject_ref for o in outcome.outcomes] == [s.subject_ref for s in batch.subjects]
    assert {o.status for o in outcome.outcomes} == {"done"}
    assert [o.affected for o in outcome.outcomes] == [per_subject] * IN_BATCH + [0, 0, 0]
    assert outcome.affected == IN_BATCH * per_subject
    assert outcome.evidence["rows_changed"] == IN_BATCH * per_subject
    assert outcome.evidence["subjects_failed_verify"] == 0
    after = await ward.checksums()
    erased = {key for n in range(IN_BATCH) for key in _keys_of(table, n)}
    for name in before:
        kept = {k: v for k, v in before[name].items() if name != table or k not in erased}
        assert {k: v for k, v in after[name].items() if k in kept} == kept, name
        # The other tenant's subjects of the same ids, and the batch's tenant's others, stay.
        assert set(kept) <= set(after[name])
    rows = await ward.rows(table)
    for key in erased:
        _assert_erased(action, table, rows.get(key))
    _assert_no_subject_id(outcome, BATCH_IDS)


@pytest.mark.parametrize(("action", "table"), CASES)
async def test_the_statements_sent_do_not_grow_with_the_batch(
    ward: Ward, action: Action, table: str
) -> None:
    eraser = SqlEraser(ward.engine)
    locator = _locator(ward, table)
    await eraser.erase_batch(batch_of(locator, action, [sid(399)]))  # the tables described

    with _statements(ward.engine) as small:
        ten = await eraser.erase_batch(batch_of(locator, action, [sid(n) for n in range(10)]))
    with _statements(ward.engine) as large:
        many = await eraser.erase_batch(batch_of(locator, action, [sid(n) for n in range(10, 310)]))

    assert {o.status for o in ten.outcomes + many.outcomes} == {"done"}
    per_subject = 1 if table == "patients" else 2
    assert (ten.evidence["rows_changed"], many.evidence["rows_changed"]) == (
        10 * per_subject,
        300 * per_subject,
    )
    assert len(small) == len(large) and len(small) <= 8, (small, large)
    # The ids travel as one array parameter, not as one parameter (or statement) each.
    assert any("= ANY (" in statement for statement in large)


@contextmanager
def _statements(engine: AsyncEngine) -> Iterator[list[str]]:
    """The statements the engine sends while the block runs (one each, executemany or not)."""
    sent: list[str] = []

    def before(*args: Any) -> None:
        sent.append(str(args[2]))

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    try:
        yield sent
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", before)


async def test_another_tenants_subject_of_the_same_id_stays(ward: Ward) -> None:
    before = await ward.checksums()
    batch = batch_of(patients_locator(ward), "delete", [sid(1), sid(2)], tenant=OTHER)
    outcome = await SqlEraser(ward.engine).erase_batch(batch)
    assert [(o.status, o.affected) for o in outcome.outcomes] == [("done", 1), ("done", 1)]
    after = await ward.checksums()
    gone = {_patient_id(OTHER, 1), _patient_id(OTHER, 2)}
    assert set(before["patients"]) - set(after["patients"]) == gone
    assert after["patients"][_patient_id(TENANT, 1)] == before["patients"][_patient_id(TENANT, 1)]


async def test_an_injection_shaped_id_erases_nothing_else(ward: Ward) -> None:
    before = await ward.checksums()
    for action in ("delete", "soft_delete", "anonymize"):
        batch = batch_of(patients_locator(ward), action, [ODD, "%", "p-00__"])
        outcome = await SqlEraser(ward.engine).erase_batch(batch)
        assert [(o.status, o.affected) for o in outcome.outcomes] == [("done", 0)] * 3
        assert outcome.evidence["rows_changed"] == 0
        _assert_no_subject_id(outcome, [ODD, "%", "p-00__"])
    assert await ward.checksums() == before


@pytest.fixture
async def visits(ward: Ward) -> Table:
    """A table whose subject column is an integer: subjects 1 ... 5 have a visit each."""
    table = Table(
        "visits",
        ward.metadata,
        Column("id", Integer, primary_key=True),
        Column("patient_no", Integer, nullable=False),
        Column("reason", Text),
    )
    async with ward.engine.begin() as conn:
        await conn.run_sync(table.create)
        await conn.execute(
            insert(table), [{"id": n, "patient_no": n, "reason": f"r{n}"} for n in range(1, 6)]
        )
    return table


async def test_an_id_that_does_not_fit_fails_alone(ward: Ward, visits: Table) -> None:
    locator = SqlTableLocator(
        table=ward.name("visits"), subject_column="patient_no", columns={"reason": "user"}
    )
    ids = ["1", "abc", "2", "99999999999", "1' OR '1'='1", "7"]
    outcome = await SqlEraser(ward.engine).erase_batch(batch_of(locator, "delete", ids))
    got = [(o.status, o.affected) for o in outcome.outcomes]
    assert got == [
        ("done", 1),
        ("failed", 0),
        ("done", 1),
        ("failed", 0),
        ("failed", 0),
        ("done", 0),
    ]
    for failed in (outcome.outcomes[i] for i in (1, 3, 4)):
        assert "does not fit column 'patient_no'" in failed.detail
        assert "abc" not in failed.detail and "9999" not in failed.detail
    assert outcome.evidence["subjects_not_fitting"] == 3
    async with ward.engine.connect() as conn:
        left = (await conn.execute(select(visits.c.patient_no))).scalars().all()
    assert sorted(left) == [3, 4, 5]


@pytest.mark.parametrize(("action", "rows"), [("delete", 0), ("soft_delete", 1)])
async def test_erasing_a_batch_twice_changes_nothing_more(
    ward: Ward, action: Action, rows: int
) -> None:
    """The second call finds nothing left to change: a delete reports no rows (outside a retry
    there is no earlier attempt to report), a soft delete the rows still marked."""
    eraser = SqlEraser(ward.engine)
    batch = batch_of(patients_locator(ward), action, [sid(n) for n in range(50)])
    first = await eraser.erase_batch(batch)
    after_first = await ward.checksums()
    again = await eraser.erase_batch(batch)
    assert [o.affected for o in first.outcomes] == [1] * 50
    assert [(o.status, o.affected) for o in again.outcomes] == [("done", rows)] * 50
    assert (again.evidence["rows"], again.evidence["rows_changed"]) == (rows * 50, 0)
    assert await ward.checksums() == after_first


def _activity_env(monkeypatch: pytest.MonkeyPatch, sql_url: str) -> ActivityEnvironment:
    monkeypatch.setenv("LETHE_TEST_PATIENTS_URL", sql_url)
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, task_queue="lethe-eu")
    return env


@pytest.mark.parametrize(
    ("action", "table"), [("delete", "lab_results"), ("anonymize", "patients")]
)
async def test_a_retry_after_the_commit_reports_the_first_attempts_rows(
    connectors: Connectors,
    ward: Ward,
    sql_url: str,
    monkeypatch: pytest.MonkeyPatch,
    action: Action,
    table: str,
) -> None:
    """The first attempt's worker was lost after its commit: the retry finds nothing left and
    reports each subject's rows as the first attempt heartbeated them; when no heartbeat
    arrived, it says the count is not known."""
    env = _activity_env(monkeypatch, sql_url)
    ids = [sid(n) for n in range(20)] + ["p-9999"]
    batch = batch_of(_locator(ward, table), action, ids, connection="LETHE_TEST_PATIENTS_URL")
    beats: list[Any] = []
    env.on_heartbeat = lambda *details: beats.extend(details)
    first: BatchStepOutcome = await env.run(connectors.activity("sql.erase_batch"), batch)
    per_subject = 1 if table == "patients" else 2
    assert [o.affected for o in first.outcomes] == [per_subject] * 20 + [0]
    record = beats[-1]
    assert record["lethe_effect"]["made"] == {"rows_changed": 20 * per_subject}
    assert set(record["rows"]) == {s.subject_ref for s in batch.subjects[:20]}
    assert all(subject_id not in repr(beats) for subject_id in ids)
    after_first = await ward.checksums()

    plan = next(b for b in beats if b["lethe_effect"]["stage"] == "planned")
    # The last heartbeat that reached the server: the result, or only the plan.
    for told, evidence in [(record, "recorded"), (plan, "planned")]:
        env.info = dataclasses.replace(env.info, attempt=2, heartbeat_details=[told])
        retried: BatchStepOutcome = await env.run(connectors.activity("sql.erase_batch"), batch)
        assert [(o.status, o.affected) for o in retried.outcomes] == [
            ("done", per_subject)
        ] * 20 + [("done", 0)]
        assert "an earlier attempt had done it" in retried.outcomes[0].detail
        assert (retried.evidence["first_attempt_evidence"], retried.evidence["rows_changed"]) == (
            evidence,
            0,
        )
        assert retried.evidence["subjects_counted_by_earlier_attempt"] == 20
        assert await ward.checksums() == after_first

    env.info = dataclasses.replace(env.info, attempt=2, heartbeat_details=[])
    lost: BatchStepOutcome = await env.run(connectors.activity("sql.erase_batch"), batch)
    assert lost.evidence["first_attempt_evidence"] == "lost"
    assert (lost.outcomes[0].status, lost.outcomes[0].affected) == ("done", 0)
    assert "is not known" in lost.outcomes[0].detail


async def test_a_single_subject_is_a_batch_of_one(ward: Ward) -> None:
    """`erase` runs the batch code on a batch of one: the same request id and step."""
    request = step_request(
        step(patients_locator(ward), action="soft_delete", system=SYSTEM),
        subject=Subject(tenant=TENANT, subject_id=sid(5)),
        started=datetime.now(UTC) - timedelta(minutes=1),
    )
    batch = one_batch(request)
    assert (batch.request_id, batch.step, batch.batch) == (request.request_id, request.step, 0)
    assert batch.single(batch.subjects[0]).subject == request.subject
    erased = await SqlEraser(ward.engine).erase(request)
    assert (erased.affected, erased.evidence["rows_changed"]) == (1, 1)
    assert (await ward.rows("patients"))[5]["deleted_at"] is not None


async def test_a_char_subject_column_counts_each_subjects_rows(ward: Ward) -> None:
    """CHAR values come back padded with blanks: each row is still counted for its subject."""
    table = Table(
        "cards",
        ward.metadata,
        Column("id", Integer, primary_key=True),
        Column("holder", CHAR(10), nullable=False),
        Column("note", Text),
    )
    async with ward.engine.begin() as conn:
        await conn.run_sync(table.create)
        await conn.execute(
            insert(table),
            [{"id": n, "holder": f"h{n % 3}", "note": "x"} for n in range(9)],
        )
    locator = SqlTableLocator(
        table=ward.name("cards"), subject_column="holder", columns={"note": "user"}
    )
    outcome = await SqlEraser(ward.engine).erase_batch(
        batch_of(locator, "pseudonymize", ["h0", "h1", "h7"])
    )
    assert [(o.status, o.affected) for o in outcome.outcomes] == [
        ("done", 3),
        ("done", 3),
        ("done", 0),
    ]
    assert outcome.evidence["rows_changed"] == 6


class LosesItsWorker(SqlEraser):
    """Commits, then fails as a worker lost before the activity completes (once)."""

    commits = 0

    async def _commit(self, conn: AsyncConnection) -> None:
        await super()._commit(conn)
        LosesItsWorker.commits += 1
        if LosesItsWorker.commits == 1:
            raise RuntimeError("the worker was lost after the commit")


@workflow.defn(sandboxed=False)  # defined beside the test, which imports non-workflow code
class OneSqlBatch:
    """Runs one batch's erase activity with a retry, as the bulk workflow would."""

    @workflow.run
    async def run(self, batch: BatchStepRequest) -> BatchStepOutcome:
        outcome: BatchStepOutcome = await workflow.execute_activity(
            "test.sql.erase_batch",
            batch,
            result_type=BatchStepOutcome,
            start_to_close_timeout=timedelta(seconds=60),
            heartbeat_timeout=timedelta(seconds=30),
            retry_policy=RetryPolicy(maximum_attempts=2, initial_interval=timedelta(seconds=1)),
        )
        return outcome


async def test_a_retry_through_temporal_reports_the_rows_the_lost_attempt_erased(
    ward: Ward, stack_temporal: TemporalClient
) -> None:
    """Attempt 1 commits and is lost before completing; the plan it heartbeated (and waited
    for) reached the server, so attempt 2, finding every row erased, reports each subject's
    rows as attempt 1 counted them, not 0."""
    LosesItsWorker.commits = 0

    @activity.defn(name="test.sql.erase_batch")
    async def erase_batch(batch: BatchStepRequest) -> BatchStepOutcome:
        async with kept_alive():
            return await LosesItsWorker(ward.engine).erase_batch(batch)

    batch = batch_of(lab_results_locator(ward), "delete", [sid(n) for n in range(30)])
    queue = f"lethe-test-sql-batch-{uuid.uuid4().hex[:8]}"
    async with Worker(
        stack_temporal, task_queue=queue, workflows=[OneSqlBatch], activities=[erase_batch]
    ):
        outcome = await stack_temporal.execute_workflow(
            OneSqlBatch.run, batch, id=f"sql-batch-{uuid.uuid4()}", task_queue=queue
        )
    assert LosesItsWorker.commits == 2
    assert [(o.status, o.affected) for o in outcome.outcomes] == [("done", 2)] * 30
    assert outcome.evidence["first_attempt_evidence"] == "planned"
    assert (outcome.evidence["attempt"], outcome.evidence["rows_changed"]) == (2, 0)
    assert outcome.evidence["earlier_found_rows_changed"] == 60
    assert "an earlier attempt had done it (2 row(s)" in outcome.outcomes[0].detail


@contextmanager
def _compiled(engine: AsyncEngine) -> Iterator[list[str]]:
    """The statements compiled anew (not found in SQLAlchemy's compiled cache) while the block
    runs."""
    compiled: list[str] = []

    def after(*args: Any) -> None:
        context = args[4]
        if context.cache_hit is not CacheStats.CACHE_HIT:
            compiled.append(f"{context.cache_hit.name}: {args[2]}")

    event.listen(engine.sync_engine, "after_cursor_execute", after)
    try:
        yield compiled
    finally:
        event.remove(engine.sync_engine, "after_cursor_execute", after)


@pytest.mark.parametrize(("action", "table"), CASES)
async def test_statements_are_compiled_once_per_description(
    ward: Ward, action: Action, table: str
) -> None:
    """The tables' description is kept, and so are the statements compiled on it: the next
    subjects' preflight, erase and verify compile nothing (each compile costs the worker CPU)."""
    eraser = SqlEraser(ward.engine)
    locator = _locator(ward, table)
    first = batch_of(locator, action, [sid(0)])
    assert await eraser.preflight(first.single(first.subjects[0])) == []
    await eraser.erase_batch(first)
    with _compiled(ward.engine) as compiled:
        for n in range(1, 4):
            batch = batch_of(locator, action, [sid(n)])
            assert await eraser.preflight(batch.single(batch.subjects[0])) == []
            outcome = await eraser.erase_batch(batch)
            assert [(o.status, o.affected) for o in outcome.outcomes] == [
                ("done", 1 if table == "patients" else 2)
            ]
            again = await eraser.verify_batch(batch, outcome)
            assert [o.status for o in again.outcomes] == ["done"]
    assert compiled == []


async def test_a_verify_right_after_the_erase_checks_the_description_once(ward: Ward) -> None:
    """Erase checks the kept description against the database (one `LIMIT 0` read of each
    table); the verify that follows in the same call builds on it, a later verify checks again."""
    eraser = SqlEraser(ward.engine)
    locator = lab_results_locator(ward)
    await eraser.erase_batch(batch_of(locator, "pseudonymize", [sid(0)]))  # described
    batch = batch_of(locator, "pseudonymize", [sid(1), sid(2)])
    with _statements(ward.engine) as erasing:
        outcome = await eraser.erase_batch(batch)
    with _statements(ward.engine) as verifying:
        again = await eraser.verify_batch(batch, outcome)
    assert [o.status for o in outcome.outcomes + again.outcomes] == ["done"] * 4
    probes = [[s for s in sent if "LIMIT" in s] for sent in (erasing, verifying)]
    assert [len(probe) for probe in probes] == [2, 2]  # lab_results and appointments, once each
    assert eraser.schemas.reads == 1
