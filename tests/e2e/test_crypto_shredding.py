"""Crypto-shredding through the CLI: an erasure with a `keys` system, and a key-store restore.

The sample hospital's data map gets a `keys` system: a key store (a database of this module's
own) under which the hospital's services encrypt patient events. A DPO erases a patient through
`lethe`; the certificate and the ledger carry the shredding's evidence, and the canary and the
patient's events no longer decrypt. Then the key store is restored from a backup taken before
the erasure, and `lethe forget-list replay --system patient-keys` shreds the keys again.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import delete, insert

from lethe.activities.shred import canary_place
from lethe.contracts import Subject
from lethe.evidence import ledger
from lethe.evidence.store import engine_for
from lethe.examples.seed import Patient
from lethe.kernel.config import Settings
from lethe.kernel.errors import KeyShredded
from lethe.keys import store as key_store
from lethe.keys.service import KeyService
from tests.e2e.conftest import (
    Hospital,
    WorkerProcess,
    approve_and_complete,
    certificate_of,
    erase_and_wait_for_approval,
)
from tests.key_stores import EVENTS, KEYS_SYSTEM, fresh_key_store, key_rows, key_service

KEYS_VARIABLE = "LETHE_E2E_KEYS_STORE_URL"


@pytest.fixture(scope="module")
async def keys_url(hospital: Hospital) -> AsyncIterator[str]:
    """The hospital's key store, added to its data map as the system `patient-keys`."""
    async with fresh_key_store("e2e") as url:
        with pytest.MonkeyPatch.context() as env:
            env.setenv(KEYS_VARIABLE, url)  # the CLI's and the worker's environment
            with hospital.datamap.open("a") as datamap:
                datamap.write(KEYS_SYSTEM.format(region=hospital.region, variable=KEYS_VARIABLE))
            yield url


@pytest.fixture(scope="module")
async def worker(hospital: Hospital, keys_url: str) -> WorkerProcess:
    """A running worker for the hospital (with the key store in its data map)."""
    started = hospital.worker()
    await started.start()
    return started


async def _keys(hospital: Hospital, url: str, settings: Settings) -> KeyService:
    """A fresh key service on the hospital's key store, as a service (or an auditor) opens it."""
    return await key_service(url, settings.keys_master_key_bytes, hospital.subject_key)


async def _event(keys: KeyService, hospital: Hospital, patient: Patient) -> dict[str, str]:
    """The personal fields of a patient event, sealed as the hospital's services write them."""
    subject = Subject(tenant=hospital.tenant, subject_id=patient.patient_id)
    return await keys.encrypt_fields(
        subject, {"email": patient.email, "name": patient.full_name}, *EVENTS
    )


async def test_an_erasure_shreds_the_patients_keys_with_evidence(
    hospital: Hospital, worker: WorkerProcess, keys_url: str, settings: Settings
) -> None:
    ada, grace = hospital.patients[0], hospital.patients[1]
    service = await _keys(hospital, keys_url, settings)
    ada_event, grace_event = (
        await _event(service, hospital, ada),
        await _event(service, hospital, grace),
    )

    dry = await hospital.lethe(
        "erase", "--tenant", hospital.tenant, "--subject", ada.patient_id,
        "--identity", f"email={ada.email}", "--dry-run", "--json",
    )  # fmt: skip
    assert dry.code == 0, str(dry)
    planned = {s["id"]: s for r in dry.json()["regions"] for s in r["steps"]}
    keys_step = planned["patient-keys/0"]
    assert (keys_step["kind"], keys_step["action"], keys_step["phase"]) == (
        "keys",
        "shred",
        "immediate",
    )

    workflow_id = await erase_and_wait_for_approval(hospital, ada)
    await approve_and_complete(hospital, workflow_id)
    certificate = await certificate_of(hospital, workflow_id)

    shredded = next(s for s in certificate["steps"] if s["step_id"] == "patient-keys/0")
    assert shredded["status"] == "done", json.dumps(shredded, indent=1)
    assert shredded["verified"] is True
    assert shredded["affected"] == 1
    evidence = shredded["evidence"]
    assert evidence["versions_destroyed"] == 1
    assert evidence["data_keys_remaining"] == 0
    assert evidence["shredding_recorded"] is True
    assert evidence["canary_decryption"] == "KeyShredded"
    assert evidence["shredding_request"] == certificate["request_id"]
    assert "no data key left; the canary fails to decrypt (KeyShredded)" in shredded["detail"]

    # Anyone with the key store can check the proof: the canary does not decrypt, and neither
    # does the patient's event; another patient's still does.
    reader = await _keys(hospital, keys_url, settings)
    canary = base64.b64decode(evidence["canary"])
    with pytest.raises(KeyShredded):
        await reader.decrypt(canary, canary_place(certificate["request_id"]), cached=False)
    with pytest.raises(KeyShredded):
        await reader.decrypt_fields(ada_event, *EVENTS, cached=False)
    opened = await reader.decrypt_fields(grace_event, *EVENTS, cached=False)
    assert opened == {"email": grace.email, "name": grace.full_name}

    # The readable certificate shows the evidence with --verbose (the canary abbreviated).
    readable = await hospital.lethe("certificate", workflow_id, "--verbose")
    assert readable.code == 0, str(readable)
    assert "patient-keys/0" in readable.stdout, str(readable)
    assert "versions_destroyed=1" in readable.stdout, str(readable)
    assert "canary_decryption=KeyShredded" in readable.stdout, str(readable)
    assert evidence["canary"] not in readable.stdout, str(readable)

    # The hash-chained ledger keeps the same evidence.
    entries = await ledger.entries(await engine_for(hospital.store_url), certificate["request_id"])
    [step_entry] = [e for e in entries if e.system == "patient-keys"]
    assert step_entry.action == "step.done"
    assert step_entry.details["evidence.versions_destroyed"] == 1
    assert step_entry.details["evidence.canary_decryption"] == "KeyShredded"
    assert step_entry.details["evidence.canary"] == evidence["canary"]
    assert step_entry.hash in certificate["ledger_hashes"]
    verified = await hospital.lethe("audit", "verify")
    assert verified.code == 0 and "ledger intact" in verified.stdout, str(verified)


async def test_replay_shreds_keys_a_restored_key_store_brought_back(
    hospital: Hospital, worker: WorkerProcess, keys_url: str, settings: Settings
) -> None:
    patient, other = hospital.patients[2], hospital.patients[3]
    service = await _keys(hospital, keys_url, settings)
    sealed, kept = await _event(service, hospital, patient), await _event(service, hospital, other)
    ref = hospital.ref(patient)
    backup = await key_rows(service, ref)  # the key store's backup, before the erasure
    assert len(backup) == 1

    workflow_id = await erase_and_wait_for_approval(hospital, patient)
    await approve_and_complete(hospital, workflow_id)
    with pytest.raises(KeyShredded):
        await service.decrypt_fields(sealed, *EVENTS, cached=False)

    # Restore the key store from that backup: the key is back, its shredding forgotten.
    async with service.engine.begin() as conn:
        await conn.execute(insert(key_store.data_keys), backup)
        await conn.execute(
            delete(key_store.shredded).where(key_store.shredded.c.subject_ref == ref)
        )
    restored = await service.decrypt_fields(sealed, *EVENTS, cached=False)
    assert restored == {"email": patient.email, "name": patient.full_name}

    replayed = await hospital.lethe(
        "forget-list", "replay", "--system", "patient-keys", "--by", "dpo", timeout=120
    )
    assert replayed.code == 0, str(replayed)
    assert "erased" in replayed.stdout
    assert "patient-keys/0:done" in replayed.stdout
    with pytest.raises(KeyShredded):
        await service.decrypt_fields(sealed, *EVENTS, cached=False)
    assert await key_rows(service, ref) == []
    opened = await service.decrypt_fields(kept, *EVENTS, cached=False)
    assert opened == {"email": other.email, "name": other.full_name}
