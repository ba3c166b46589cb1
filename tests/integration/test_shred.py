"""The key connector against a PostgreSQL key store: shred, verify, retries, restore and replay,
and the preflight that touches nothing.

The module has a key-store database of its own on the stack (tests/key_stores.py), and each
test its own tenant, so nothing here touches another test's keys.
"""

from __future__ import annotations

import base64
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import delete, insert
from sqlalchemy.engine import make_url
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from lethe.activities import shred
from lethe.activities.connector import UnsupportedStep, erase_and_verify
from lethe.activities.connectors import Connectors
from lethe.activities.shred import KeyShredder, canary_place
from lethe.classification.datamap import KeysLocator
from lethe.contracts import Action, StepOutcome, StepRequest, Subject
from lethe.kernel.config import Settings
from lethe.kernel.errors import KeyShredded, ServiceUnavailable
from lethe.keys import store as key_store
from lethe.keys.service import KeyService, place
from tests.key_stores import fresh_key_store, key_rows, key_service
from tests.steps import decision, step, step_request

CONNECTION_VARIABLE = "LETHE_TEST_SHRED_KEYS_URL"
WHERE = place("kafka", "patient-events", "email")


@pytest.fixture(scope="module")
async def keys_url() -> AsyncIterator[str]:
    """A key-store database of this module's own."""
    async with fresh_key_store("shred") as url:
        yield url


@pytest.fixture
def shredder(keys_url: str, settings: Settings) -> KeyShredder:
    """The connector on the module's key store with the stack's master and subject keys."""
    return KeyShredder(keys_url, settings.keys_master_key_bytes, settings.subject_key_bytes)


@pytest.fixture
async def keys(keys_url: str, settings: Settings) -> KeyService:
    """A service's key service on the same key store (a fresh one: empty caches)."""
    return await key_service(keys_url, settings.keys_master_key_bytes, settings.subject_key_bytes)


def _subjects() -> tuple[Subject, Subject]:
    tenant = f"clinic-{uuid.uuid4().hex[:8]}"
    return Subject(tenant=tenant, subject_id="ada"), Subject(tenant=tenant, subject_id="grace")


def _request(
    keys: KeyService, subject: Subject, *, action: Action = "shred", request_id: str = ""
) -> StepRequest:
    retained = action == "retain"
    reason = decision(
        "retain" if retained else "soft_delete",
        rule="hipaa.record" if retained else "gdpr.contact.soft-delete",
        category="user.contact",
        exception="45 CFR 164.501" if retained else None,
    )
    locator = KeysLocator(categories=["user.contact", "user.health_and_medical"])
    return step_request(
        step(locator, action=action, connection=CONNECTION_VARIABLE, decisions=[reason]),
        subject=subject,
        subject_ref=keys.subject_ref(subject.tenant, subject.subject_id),
        request_id=request_id or f"req-{uuid.uuid4().hex[:12]}",
    )


async def test_erase_destroys_every_version_and_the_canary_proves_it(
    shredder: KeyShredder, keys: KeyService, keys_url: str, settings: Settings
) -> None:
    ada, grace = _subjects()
    # A cap of two encryptions per version gives Ada three key versions.
    capped = KeyService(keys.engine, keys.provider, settings.subject_key_bytes, max_encryptions=2)
    sealed = [await capped.encrypt(ada, b"ada@example.org %d" % n, WHERE) for n in range(5)]
    kept = await keys.encrypt(grace, b"grace@example.org", WHERE)
    request = _request(keys, ada)
    assert len(await key_rows(keys, request.subject_ref)) == 3

    outcome = await erase_and_verify(shredder, request)

    assert outcome.status == "done", outcome.detail
    assert outcome.verified
    evidence = outcome.evidence
    assert outcome.affected == 3
    assert evidence["versions_destroyed"] == 3
    assert evidence["shredding_request"] == request.request_id
    assert evidence["data_keys_remaining"] == 0
    assert evidence["shredding_recorded"] is True
    assert evidence["canary_decryption"] == "KeyShredded"
    assert isinstance(evidence["shredded_at"], str)
    assert datetime.fromisoformat(evidence["shredded_at"]) <= datetime.now(UTC)
    assert "destroyed 3 data-key version(s); canary written under data-key version 3" in (
        outcome.detail
    )
    assert "the canary fails to decrypt (KeyShredded)" in outcome.detail

    canary = base64.b64decode(str(evidence["canary"]))
    other_process = await key_service(
        keys_url, settings.keys_master_key_bytes, settings.subject_key_bytes
    )
    with pytest.raises(KeyShredded):
        await other_process.decrypt(canary, canary_place(request.request_id), cached=False)
    for value in sealed:
        with pytest.raises(KeyShredded):
            await other_process.decrypt(value, WHERE, cached=False)
    assert await other_process.decrypt(kept, WHERE) == b"grace@example.org"
    assert await key_store.latest_key(keys.engine, request.subject_ref) is None


async def test_a_retry_shreds_again_and_still_succeeds(
    shredder: KeyShredder, keys: KeyService
) -> None:
    ada, _ = _subjects()
    await keys.encrypt(ada, b"ada", WHERE)
    request = _request(keys, ada)
    first = await erase_and_verify(shredder, request)
    assert first.status == "done" and first.affected == 1

    # A retry after a crash between shredding and answering: nothing left to destroy, and the
    # key store's record of this request's first shredding says what it destroyed.
    again = await erase_and_verify(shredder, request)
    assert again.status == "done", again.detail
    assert again.evidence["versions_destroyed"] == 1
    assert again.affected == 1
    assert again.evidence["first_attempt_evidence"] == "key store"
    assert again.evidence["earlier_versions_destroyed"] == 1
    assert again.evidence["retry_versions_destroyed"] == 0
    assert again.evidence["shredding_versions_destroyed"] == 1
    assert again.evidence["shredded_at"] == first.evidence["shredded_at"]
    # Without the first attempt's heartbeat there is no canary: the key store's state decides,
    # and the detail says the canary was lost rather than never written.
    assert again.evidence["canary"] is None
    assert again.evidence["canary_decryption"] is None
    assert "canary lost: an earlier attempt of this request shredded the keys" in again.detail
    assert "no canary to try" in again.detail


async def test_a_retried_activity_keeps_the_first_attempts_canary(
    connectors: Connectors, keys: KeyService, keys_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CONNECTION_VARIABLE, keys_url)
    ada, _ = _subjects()
    await keys.encrypt(ada, b"ada", WHERE)
    request = _request(keys, ada)
    beats: list[Any] = []
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, task_queue="lethe-eu")
    env.on_heartbeat = lambda *details: beats.extend(details)
    first = await env.run(connectors.activity("keys.erase"), request)
    assert first.status == "done"
    # The canary and what is about to go were sent before the keys were destroyed.
    planned = beats[0]
    assert planned["canary"] == first.evidence["canary"]
    assert planned["lethe_effect"]["stage"] == "planned"
    assert planned["lethe_effect"]["planned"] == {"versions": 1}
    assert beats[-1]["lethe_effect"]["made"] == {"versions_destroyed": 1}
    assert "first_attempt_evidence" not in first.evidence

    retry = ActivityEnvironment()
    retry.info = dataclasses.replace(
        env.info, task_queue="lethe-eu", attempt=2, heartbeat_details=beats
    )
    again = await retry.run(connectors.activity("keys.erase"), request)
    assert again.status == "done", again.detail
    assert again.evidence["canary"] == first.evidence["canary"]
    assert again.evidence["canary_decryption"] == "KeyShredded"
    assert again.evidence["versions_destroyed"] == 1
    assert "canary kept from an earlier attempt" in again.detail


class _WorkerLost(BaseException):
    """Stands for the end of the worker's process: nothing after it runs, nothing is caught."""


class _LostAfterShredding(KeyService):
    async def shred(self, ref: str, tenant: str, request_id: str) -> int:
        await super().shred(ref, tenant, request_id)
        raise _WorkerLost


@pytest.mark.parametrize("arrived", [True, False], ids=["plan arrived", "nothing arrived"])
async def test_a_worker_lost_right_after_shredding_leaves_its_evidence(
    connectors: Connectors,
    keys: KeyService,
    keys_url: str,
    monkeypatch: pytest.MonkeyPatch,
    arrived: bool,
) -> None:
    monkeypatch.setenv(CONNECTION_VARIABLE, keys_url)
    monkeypatch.setattr(shred, "KeyService", _LostAfterShredding)
    ada, _ = _subjects()
    event = await keys.encrypt(ada, b"ada", WHERE)
    request = _request(keys, ada)
    beats: list[Any] = []
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, task_queue="lethe-eu")
    env.on_heartbeat = lambda *details: beats.extend(details)
    with pytest.raises(_WorkerLost):
        await env.run(connectors.activity("keys.erase"), request)
    assert [b["lethe_effect"]["stage"] for b in beats] == ["planned"]
    monkeypatch.setattr(shred, "KeyService", KeyService)

    retry = ActivityEnvironment()
    retry.info = dataclasses.replace(
        env.info, attempt=2, heartbeat_details=beats if arrived else []
    )
    again = await retry.run(connectors.activity("keys.erase"), request)
    assert again.status == "done", again.detail
    evidence = again.evidence
    # The key store's record of the first shredding is this request's: it says what went.
    assert (again.affected, evidence["versions_destroyed"]) == (1, 1)
    assert evidence["first_attempt_evidence"] == "key store"
    assert evidence["retry_versions_destroyed"] == 0
    assert evidence["shredding_request"] == request.request_id
    if arrived:
        assert evidence["canary"] == beats[0]["canary"]
        assert evidence["canary_decryption"] == "KeyShredded"
    else:
        assert evidence["canary"] is None
        assert "canary lost" in again.detail
    with pytest.raises(KeyShredded):
        await keys.decrypt(event, WHERE, cached=False)


async def test_a_replay_retried_after_a_lost_worker_says_what_it_cannot_know(
    connectors: Connectors,
    shredder: KeyShredder,
    keys: KeyService,
    keys_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(CONNECTION_VARIABLE, keys_url)
    ada, _ = _subjects()
    await keys.encrypt(ada, b"ada", WHERE)
    erasure = _request(keys, ada)
    backup = await key_rows(keys, erasure.subject_ref)
    assert (await erase_and_verify(shredder, erasure)).status == "done"
    async with keys.engine.begin() as conn:  # a restore brings the key back, not the record
        await conn.execute(insert(key_store.data_keys), backup)

    replay = _request(keys, ada, request_id=f"req-{uuid.uuid4().hex[:12]}")
    monkeypatch.setattr(shred, "KeyService", _LostAfterShredding)
    beats: list[Any] = []
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, task_queue="lethe-eu")
    env.on_heartbeat = lambda *details: beats.extend(details)
    with pytest.raises(_WorkerLost):
        await env.run(connectors.activity("keys.erase"), replay)
    monkeypatch.setattr(shred, "KeyService", KeyService)
    assert await key_rows(keys, erasure.subject_ref) == []

    for details, said in ((beats, "planned"), ([], "lost")):
        retry = ActivityEnvironment()
        retry.info = dataclasses.replace(env.info, attempt=2, heartbeat_details=details)
        again = await retry.run(connectors.activity("keys.erase"), replay)
        assert again.status == "done", again.detail
        # The key store's record is the first erasure's: how many this replay destroyed before
        # its worker was lost is not known, and the evidence does not make it up.
        assert again.evidence["versions_destroyed"] is None
        assert again.evidence["first_attempt_evidence"] == said
        assert again.evidence["retry_versions_destroyed"] == 0
        if said == "planned":
            assert again.evidence["earlier_found_versions"] == 1
            assert again.affected == 1


async def test_verify_fails_while_the_key_is_still_there(
    shredder: KeyShredder, keys: KeyService
) -> None:
    ada, _ = _subjects()
    request = _request(keys, ada)
    # What an erase that never reached the key store would leave: a canary, the key intact.
    canary = await keys.encrypt(ada, b"canary", canary_place(request.request_id))
    not_shredded = StepOutcome(
        step_id=request.step.id,
        status="running",
        evidence={"canary": base64.b64encode(canary).decode()},
    )
    found = await shredder.verify(request, not_shredded)
    assert found.status == "failed"
    assert found.verified
    assert found.evidence["data_keys_remaining"] == 1
    assert found.evidence["shredding_recorded"] is False
    assert found.evidence["canary_decryption"] == "decrypted"
    assert "still in the key store" in found.detail
    assert "the canary still decrypts" in found.detail
    assert await keys.decrypt(canary, canary_place(request.request_id)) == b"canary"


async def test_a_restored_key_store_is_shredded_again_by_the_replay(
    shredder: KeyShredder, keys: KeyService, keys_url: str, settings: Settings
) -> None:
    ada, grace = _subjects()
    event = await keys.encrypt(ada, b"ada@example.org", WHERE)
    kept = await keys.encrypt(grace, b"grace@example.org", WHERE)
    request = _request(keys, ada)
    ref = request.subject_ref
    backup = await key_rows(keys, ref)  # the key store's backup, taken before the erasure
    assert len(backup) == 1

    erased = await erase_and_verify(shredder, request)
    assert erased.status == "done", erased.detail

    # The key store is restored from that backup: Ada's key is back, her shredding forgotten.
    async with keys.engine.begin() as conn:
        await conn.execute(insert(key_store.data_keys), backup)
        await conn.execute(
            delete(key_store.shredded).where(key_store.shredded.c.subject_ref == ref)
        )
    fresh = await key_service(keys_url, settings.keys_master_key_bytes, settings.subject_key_bytes)
    assert await fresh.decrypt(event, WHERE, cached=False) == b"ada@example.org"

    # Half-restored, the erasure's own verification would say so.
    stale = await shredder.verify(request, erased)
    assert stale.status == "failed"
    assert stale.evidence["data_keys_remaining"] == 1
    assert stale.evidence["canary_decryption"] == "decrypted"

    # `lethe forget-list replay --system <keys system>` runs the same step for a new request.
    replay = _request(keys, ada, request_id=f"req-{uuid.uuid4().hex[:12]}")
    replayed = await erase_and_verify(shredder, replay)
    assert replayed.status == "done", replayed.detail
    assert replayed.evidence["versions_destroyed"] == 1
    assert replayed.evidence["shredding_request"] == replay.request_id
    assert replayed.evidence["canary_decryption"] == "KeyShredded"
    with pytest.raises(KeyShredded):
        await fresh.decrypt(event, WHERE, cached=False)
    # The first erasure's canary is unreadable again too.
    first_canary = base64.b64decode(str(erased.evidence["canary"]))
    with pytest.raises(KeyShredded):
        await fresh.decrypt(first_canary, canary_place(request.request_id), cached=False)
    assert await fresh.decrypt(kept, WHERE, cached=False) == b"grace@example.org"


async def test_a_subject_without_keys_is_shredded_without_making_one(
    shredder: KeyShredder, keys: KeyService
) -> None:
    ada, _ = _subjects()
    request = _request(keys, ada)
    outcome = await erase_and_verify(shredder, request)
    assert outcome.status == "done", outcome.detail
    assert outcome.affected == 0
    assert outcome.evidence["canary"] is None
    assert "not written: the subject has no data key" in outcome.detail
    assert await key_store.latest_key(keys.engine, request.subject_ref) is None
    # Erased: no key is made for the subject afterwards (their data cannot come back).
    with pytest.raises(KeyShredded, match="does not make new keys"):
        await keys.encrypt(ada, b"late event", WHERE)


async def test_a_retain_step_is_refused_and_keeps_the_keys(
    shredder: KeyShredder, keys: KeyService
) -> None:
    """The regional workflow records retain steps itself: a connector given one refuses it."""
    ada, _ = _subjects()
    sealed = await keys.encrypt(ada, b"ada", WHERE)
    request = _request(keys, ada, action="retain")
    with pytest.raises(UnsupportedStep, match="kept by policy"):
        await erase_and_verify(shredder, request)
    with pytest.raises(UnsupportedStep, match="kept by policy"):
        await shredder.preflight(request)
    assert await keys.decrypt(sealed, WHERE, cached=False) == b"ada"


async def test_activities_refuse_another_region_a_foreign_subject_key_and_other_actions(
    connectors: Connectors, keys: KeyService, keys_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CONNECTION_VARIABLE, keys_url)
    ada, _ = _subjects()
    sealed = await keys.encrypt(ada, b"ada", WHERE)
    request = _request(keys, ada)
    env = ActivityEnvironment()

    env.info = dataclasses.replace(env.info, task_queue="lethe-us")
    with pytest.raises(ApplicationError) as caught:
        await env.run(connectors.activity("keys.erase"), request)
    assert caught.value.type == "WrongRegion"
    assert caught.value.non_retryable

    env.info = dataclasses.replace(env.info, task_queue="lethe-eu")
    foreign = request.model_copy(update={"subject_ref": "ab" * 16})
    with pytest.raises(ApplicationError) as caught:
        await env.run(connectors.activity("keys.erase"), foreign)
    assert caught.value.type == "ConfigurationError"
    assert "LETHE_SUBJECT_KEY" in caught.value.message
    assert "nothing was shredded" in caught.value.message
    assert ada.subject_id not in caught.value.message

    deleting = request.model_copy(
        update={"step": request.step.model_copy(update={"action": "delete"})}
    )
    with pytest.raises(ApplicationError) as caught:
        await env.run(connectors.activity("keys.erase"), deleting)
    assert caught.value.type == "UnsupportedStep"

    monkeypatch.delenv(CONNECTION_VARIABLE)
    with pytest.raises(ApplicationError) as caught:
        await env.run(connectors.activity("keys.erase"), request)
    assert caught.value.type == "ConfigurationError"
    assert CONNECTION_VARIABLE in caught.value.message

    # None of that destroyed anything.
    assert await keys.decrypt(sealed, WHERE, cached=False) == b"ada"


# --- preflight -------------------------------------------------------------------------------

STEP_TABLES = (
    "lethe_data_keys",
    "lethe_shredded_subjects",
    "lethe_kek_versions",
    "lethe_kek_state",
)


def _admin_url(url: str, database: str | None = None) -> str:
    """The key store's URL as psycopg (the service's own client) takes it."""
    parsed = make_url(url).set(drivername="postgresql")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


async def _dump(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the key store's tables that exist, read with psycopg: what a preflight must
    leave exactly as it found it."""
    async with await psycopg.AsyncConnection.connect(_admin_url(url)) as conn:
        tables = [
            row[0]
            for row in await (
                await conn.execute(
                    "SELECT table_name FROM information_schema.tables "
                    "WHERE table_schema = 'public' ORDER BY table_name"
                )
            ).fetchall()
        ]
        dump: dict[str, list[tuple[Any, ...]]] = {}
        for table in tables:
            rows = await (await conn.execute(f'SELECT * FROM "{table}"')).fetchall()
            dump[table] = sorted(rows, key=repr)
        return dump


async def test_preflight_passes_for_a_good_key_store_and_changes_nothing(
    shredder: KeyShredder, keys: KeyService, keys_url: str
) -> None:
    ada, grace = _subjects()
    await keys.encrypt(ada, b"ada", WHERE)
    before = await _dump(keys_url)
    assert set(STEP_TABLES) <= set(before)

    assert await shredder.preflight(_request(keys, ada)) == []
    assert await shredder.preflight(_request(keys, grace)) == []  # no key yet: nothing to shred

    assert await _dump(keys_url) == before


async def test_preflight_refuses_a_reference_this_worker_does_not_make(
    shredder: KeyShredder, keys: KeyService, keys_url: str
) -> None:
    ada, _ = _subjects()
    await keys.encrypt(ada, b"ada", WHERE)
    before = await _dump(keys_url)
    request = _request(keys, ada)

    foreign = request.model_copy(update={"subject_ref": "ab" * 16})
    assert await shredder.preflight(foreign) == [
        "key store of system 'patient-keys': this worker's LETHE_SUBJECT_KEY is not the one the "
        "request's subject reference was made with, so the key store names the subject "
        "differently"
    ]
    malformed = request.model_copy(update={"subject_ref": "not a reference"})
    assert await shredder.preflight(malformed) == [
        "key store of system 'patient-keys': the subject reference is malformed"
    ]
    assert await _dump(keys_url) == before


async def test_preflight_of_an_empty_database_names_the_missing_tables_and_makes_none(
    keys: KeyService, settings: Settings
) -> None:
    ada, _ = _subjects()
    async with fresh_key_store("preflight") as empty:
        shredder = KeyShredder(empty, settings.keys_master_key_bytes, settings.subject_key_bytes)
        problems = await shredder.preflight(_request(keys, ada))
        assert problems == [
            f"key store of system 'patient-keys': table {table} does not exist (no service has "
            "used this key store yet, or its URL names another database)"
            for table in STEP_TABLES
        ]
        assert await _dump(empty) == {}


async def test_preflight_names_a_database_that_does_not_exist_and_refused_credentials(
    connectors: Connectors,
    keys: KeyService,
    keys_url: str,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ada, _ = _subjects()
    request = _request(keys, ada)
    where = "key store of system 'patient-keys'"
    name = f"lethe_keys_missing_{uuid.uuid4().hex[:8]}"
    missing = make_url(keys_url).set(database=name).render_as_string(hide_password=False)

    started = time.monotonic()
    shredder = KeyShredder(missing, settings.keys_master_key_bytes, settings.subject_key_bytes)
    assert await shredder.preflight(request) == [
        f"{where}: the database its URL names does not exist"
    ]
    assert time.monotonic() - started < 5
    async with await psycopg.AsyncConnection.connect(_admin_url(keys_url, "postgres")) as conn:
        found = await conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        assert await found.fetchone() is None

    nobody = make_url(keys_url).set(username=f"nobody_{uuid.uuid4().hex[:8]}")
    stranger = KeyShredder(
        nobody.render_as_string(hide_password=False),
        settings.keys_master_key_bytes,
        settings.subject_key_bytes,
    )
    assert await stranger.preflight(request) == [f"{where}: the server refused the credentials"]

    # As the activity: a clear problem, not one to wait out.
    monkeypatch.setenv(CONNECTION_VARIABLE, missing)
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, task_queue="lethe-eu")
    check = await env.run(connectors.activity("keys.preflight"), request)
    assert check.problems == [f"{where}: the database its URL names does not exist"]
    assert not check.transient


async def test_preflight_of_an_unreachable_key_store_is_quick_and_transient(
    connectors: Connectors,
    keys: KeyService,
    keys_url: str,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ada, _ = _subjects()
    request = _request(keys, ada)
    unreachable = make_url(keys_url).set(host="127.0.0.1", port=1)
    url = unreachable.render_as_string(hide_password=False)

    started = time.monotonic()
    shredder = KeyShredder(url, settings.keys_master_key_bytes, settings.subject_key_bytes)
    with pytest.raises(ServiceUnavailable) as caught:
        await shredder.preflight(request)
    assert time.monotonic() - started < 5
    assert str(caught.value).startswith("key store of system 'patient-keys' did not answer")

    monkeypatch.setenv(CONNECTION_VARIABLE, url)
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, task_queue="lethe-eu")
    check = await env.run(connectors.activity("keys.preflight"), request)
    assert check.transient
    assert check.problems == [f"ServiceUnavailable: {caught.value}"]


async def test_preflight_says_what_the_database_user_may_not_do(
    keys: KeyService, keys_url: str, settings: Settings
) -> None:
    ada, _ = _subjects()
    await keys.encrypt(ada, b"ada", WHERE)
    before = await _dump(keys_url)
    role = f"lethe_reader_{uuid.uuid4().hex[:8]}"
    admin = _admin_url(keys_url)
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
        await conn.execute(f'CREATE ROLE "{role}" LOGIN')
        await conn.execute(f'GRANT SELECT ON {", ".join(STEP_TABLES)} TO "{role}"')
    try:
        reader = make_url(keys_url).set(username=role).render_as_string(hide_password=False)
        shredder = KeyShredder(reader, settings.keys_master_key_bytes, settings.subject_key_bytes)
        assert await shredder.preflight(_request(keys, ada)) == [
            "key store of system 'patient-keys': the database user may not DELETE on "
            "lethe_data_keys, UPDATE on lethe_data_keys, INSERT on lethe_shredded_subjects"
        ]
    finally:
        async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
            await conn.execute(f'DROP OWNED BY "{role}"')
            await conn.execute(f'DROP ROLE "{role}"')
    assert await _dump(keys_url) == before


async def test_preflight_of_a_missing_sqlite_key_store_does_not_create_it(
    keys: KeyService, settings: Settings, tmp_path: Path
) -> None:
    ada, _ = _subjects()
    path = tmp_path / "keys.db"
    shredder = KeyShredder(
        f"sqlite+aiosqlite:///{path}", settings.keys_master_key_bytes, settings.subject_key_bytes
    )
    assert await shredder.preflight(_request(keys, ada)) == [
        "key store of system 'patient-keys': its database file does not exist"
    ]
    assert not path.exists()
