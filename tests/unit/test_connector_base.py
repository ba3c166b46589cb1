"""The one connector base: every kind describes itself, refuses what is not its own the same
way, and a worker's activities cover every kind under the names the regional workflow uses."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, get_args

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from lethe.activities.clients import Clients
from lethe.activities.connector import Connector, UnsupportedStep
from lethe.activities.connectors import KINDS, Connectors, describe
from lethe.classification.datamap import (
    BlobBackupLocator,
    KafkaTopicLocator,
    KeysLocator,
    Locator,
    LogLocator,
    RedisHashField,
    RedisLocator,
    SqlTableLocator,
    SystemKind,
)
from lethe.cli.connectors import markdown
from lethe.contracts import Action, StepRequest
from tests.steps import step, step_request

ROOT = Path(__file__).resolve().parents[2]
LOCATORS: dict[str, Locator] = {
    "sql": SqlTableLocator(table="patients", subject_column="id", columns={"email": "user"}),
    "kafka": KafkaTopicLocator(topic="events", key_template="{subject_id}", categories=["user"]),
    "redis": RedisLocator(
        hash_fields=[RedisHashField(key="by-email", field="{subject_id}")], categories=["user"]
    ),
    "blob": BlobBackupLocator(container="exports", subject_tag="ref", categories=["user"]),
    "logs": LogLocator(container="logs", fields={"user": "subject_id"}, categories=["user"]),
    "keys": KeysLocator(categories=["user"]),
}


def _request(kind: str, action: Action, *, locator_of: str | None = None) -> StepRequest:
    return step_request(step(LOCATORS[locator_of or kind], action=action, system=f"{kind}-1"))


def test_every_kind_of_system_has_one_connector_that_describes_itself() -> None:
    infos = describe()
    assert sorted(i.kind for i in infos) == sorted(get_args(SystemKind))
    for info, kind in zip(infos, KINDS, strict=True):
        assert info.kind == kind.kind and info.connector == kind.__name__
        assert info.locator == kind.locator_model.__name__ and info.locator_fields
        assert info.actions and "retain" not in info.actions
        assert info.summary and info.preflight and info.verify and info.retry
    phases = {i.kind: i.phase for i in infos}
    assert {k for k, p in phases.items() if p == "deferred"} == {"blob", "logs"}


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_a_connector_takes_only_its_own_steps(kind: type[Connector[Any]]) -> None:
    action = kind.actions[0]
    assert kind.locator(_request(kind.kind, action)) == LOCATORS[kind.kind]
    with pytest.raises(UnsupportedStep, match="kept by policy"):
        kind.locator(_request(kind.kind, "retain"))
    other = "sql" if kind.kind != "sql" else "kafka"
    with pytest.raises(UnsupportedStep, match=f"the {kind.kind} connector does not run it"):
        kind.locator(_request(other, action, locator_of=other))
    lacking = next(a for a in get_args(Action) if a not in (*kind.actions, "retain"))
    with pytest.raises(UnsupportedStep, match=f"{kind.kind} cannot '{lacking}'; use "):
        kind.locator(_request(kind.kind, lacking))


async def test_a_worker_s_activities_are_every_kind_s_six_under_their_workflow_names() -> None:
    async with Clients() as clients:
        activities = Connectors(clients).activities()
    names = {getattr(a, "__temporal_activity_definition").name for a in activities}
    assert names == {
        f"{k}.{op}"
        for k in get_args(SystemKind)
        for op in ("erase", "verify", "preflight", "erase_batch", "verify_batch", "sweep")
    } | {"sql.subjects", "redis.subjects", "region.preflight"}


async def test_a_region_s_preflight_checks_each_step_in_order_and_never_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LETHE_STACK_SQL_URL", raising=False)
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, task_queue="lethe-eu")
    wrong_kind = _request("kafka", "tombstone")
    wrong_kind = wrong_kind.model_copy(
        update={"step": wrong_kind.step.model_copy(update={"kind": "sql", "id": "a"})}
    )
    elsewhere = _request("redis", "purge")
    elsewhere = elsewhere.model_copy(
        update={"step": elsewhere.step.model_copy(update={"region": "us", "id": "b"})}
    )
    async with Clients() as clients:
        checks = await env.run(
            Connectors(clients).activity("region.preflight"), [wrong_kind, elsewhere]
        )
    assert [c.step_id for c in checks] == ["a", "b"]
    assert all(not c.ready and not c.transient for c in checks), checks
    assert checks[0].problems[0].startswith("UnsupportedStep: ")
    assert "us" in checks[1].problems[0], checks[1]


async def test_an_activity_refuses_a_step_of_another_kind_before_reading_any_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LETHE_STACK_SQL_URL", raising=False)  # the step's connection: unset
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, task_queue="lethe-eu")
    request = _request("kafka", "tombstone")
    request = request.model_copy(
        update={"step": request.step.model_copy(update={"connection": "LETHE_STACK_SQL_URL"})}
    )
    async with Clients() as clients:
        connectors = Connectors(clients)
        with pytest.raises(ApplicationError) as caught:
            await env.run(connectors.activity("sql.erase"), request)
        check = await env.run(connectors.activity("sql.preflight"), request)
    assert caught.value.type == "UnsupportedStep" and caught.value.non_retryable
    assert not check.ready and not check.transient
    assert check.problems[0].startswith("UnsupportedStep: ")


async def test_closed_clients_open_nothing_more() -> None:
    clients = Clients()
    engine = clients.sql_engine("sqlite+aiosqlite://")
    assert clients.sql_engine("sqlite+aiosqlite://") is engine
    await clients.close()
    with pytest.raises(RuntimeError, match="closed"):
        clients.sql_engine("sqlite+aiosqlite:///other.db")


def test_the_readme_lists_the_connectors_as_their_code_describes_them() -> None:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- connectors: [^>]*-->\n(.*?)<!-- /connectors -->", readme, re.S)
    assert found is not None, "README.md has no connectors table"
    assert found.group(1) == markdown(describe()), "run `lethe connectors --markdown`"
