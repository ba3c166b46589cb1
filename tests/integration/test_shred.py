"""The key connector against a PostgreSQL key store: shred, verify, retries, restore and replay.

The module has a key-store database of its own on the stack (tests/key_stores.py), and each
test its own tenant, so nothing here touches another test's keys.
"""

from __future__ import annotations

import base64
import dataclasses
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import delete, insert
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities import shred
from activities.common import erase_and_verify
from activities.shred import KeyShredder, canary_place
from classification.datamap import KeysLocator
from lethe import key_store
from lethe.config import Settings
from lethe.contracts import Action, Decision, Step, StepOutcome, StepRequest, Subject
from lethe.errors import KeyShredded
from lethe.keys import KeyService, place
from tests.key_stores import fresh_key_store, key_rows, key_service

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
    now = datetime.now(UTC)
    step = Step(
        id="patient-keys/0",
        system="patient-keys",
        kind="keys",
        region="eu",
        connection=CONNECTION_VARIABLE,
        locator=KeysLocator(categories=["user.contact", "user.health_and_medical"]),
        action=action,
        phase="immediate",
        decisions=[
            Decision(
                rule="gdpr.contact.soft-delete" if action != "retain" else "hipaa.record",
                category="user.contact",
                strategy="soft_delete" if action != "retain" else "retain",
                citation="GDPR Art. 17(1)",
                exception=None if action != "retain" else "45 CFR 164.501",
            )
        ],
    )
    return StepRequest(
        request_id=request_id or f"req-{uuid.uuid4().hex[:12]}",
        subject_ref=keys.subject_ref(subject.tenant, subject.subject_id),
        subject=subject,
        step=step,
        erasure_started_at=now,
        window_ends_at=now + timedelta(days=30),
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
    # key store's record still says what this request destroyed.
    again = await erase_and_verify(shredder, request)
    assert again.status == "done", again.detail
    assert again.evidence["versions_destroyed"] == 0
    assert again.affected == 1
    assert again.evidence["shredding_versions_destroyed"] == 1
    assert again.evidence["shredded_at"] == first.evidence["shredded_at"]
    # Without the first attempt's heartbeat there is no canary: the key store's state decides.
    assert again.evidence["canary"] is None
    assert again.evidence["canary_decryption"] is None
    assert "not written: the subject's keys were shredded before" in again.detail
    assert "no canary to try" in again.detail


async def test_a_retried_activity_keeps_the_first_attempts_canary(
    keys: KeyService, keys_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CONNECTION_VARIABLE, keys_url)
    ada, _ = _subjects()
    await keys.encrypt(ada, b"ada", WHERE)
    request = _request(keys, ada)
    beats: list[Any] = []
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, task_queue="lethe-eu")
    env.on_heartbeat = lambda *details: beats.extend(details)
    first = await env.run(shred.erase, request)
    assert first.status == "done"
    assert beats == [{"canary": first.evidence["canary"]}]  # sent before the keys were destroyed

    retry = ActivityEnvironment()
    retry.info = dataclasses.replace(
        env.info, task_queue="lethe-eu", attempt=2, heartbeat_details=beats
    )
    again = await retry.run(shred.erase, request)
    assert again.status == "done", again.detail
    assert again.evidence["canary"] == first.evidence["canary"]
    assert again.evidence["canary_decryption"] == "KeyShredded"
    assert "canary kept from an earlier attempt" in again.detail


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


async def test_a_retain_step_keeps_the_keys(shredder: KeyShredder, keys: KeyService) -> None:
    ada, _ = _subjects()
    sealed = await keys.encrypt(ada, b"ada", WHERE)
    request = _request(keys, ada, action="retain")
    outcome = await erase_and_verify(shredder, request)
    assert outcome.status == "retained"
    assert "45 CFR 164.501" in outcome.detail
    assert await keys.decrypt(sealed, WHERE, cached=False) == b"ada"


async def test_activities_refuse_another_region_a_foreign_subject_key_and_other_actions(
    keys: KeyService, keys_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CONNECTION_VARIABLE, keys_url)
    ada, _ = _subjects()
    sealed = await keys.encrypt(ada, b"ada", WHERE)
    request = _request(keys, ada)
    env = ActivityEnvironment()

    env.info = dataclasses.replace(env.info, task_queue="lethe-us")
    with pytest.raises(ApplicationError) as caught:
        await env.run(shred.erase, request)
    assert caught.value.type == "WrongRegion"
    assert caught.value.non_retryable

    env.info = dataclasses.replace(env.info, task_queue="lethe-eu")
    foreign = request.model_copy(update={"subject_ref": "ab" * 16})
    with pytest.raises(ApplicationError) as caught:
        await env.run(shred.erase, foreign)
    assert caught.value.type == "ConfigurationError"
    assert "LETHE_SUBJECT_KEY" in caught.value.message
    assert "nothing was shredded" in caught.value.message
    assert ada.subject_id not in caught.value.message

    deleting = request.model_copy(
        update={"step": request.step.model_copy(update={"action": "delete"})}
    )
    with pytest.raises(ApplicationError) as caught:
        await env.run(shred.erase, deleting)
    assert caught.value.type == "UnsupportedStep"

    monkeypatch.delenv(CONNECTION_VARIABLE)
    with pytest.raises(ApplicationError) as caught:
        await env.run(shred.erase, request)
    assert caught.value.type == "ConfigurationError"
    assert CONNECTION_VARIABLE in caught.value.message

    # None of that destroyed anything.
    assert await keys.decrypt(sealed, WHERE, cached=False) == b"ada"
