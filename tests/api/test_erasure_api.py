"""A DPO's erasure through the HTTP API on the real stack: submit, follow, approve, certificate;
other tenants and other services see nothing of it; errors are problem documents; no subject id
reaches a URL or a log line."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from tests.api.conftest import Api

pytestmark = pytest.mark.timeout(300)
PROBLEM = "application/problem+json"


async def _state(api: Api, request_id: str, state: str, timeout: float = 90) -> dict[str, Any]:
    """Poll the status endpoint as the DPO until the request is in `state`."""
    async with api.client("dpo-a") as http, asyncio.timeout(timeout):
        while True:
            answer = await http.get(f"/v1/erasures/{request_id}")
            assert answer.status_code == 200, answer.text
            body: dict[str, Any] = answer.json()
            if body["status"]["state"] == state:
                return body
            await asyncio.sleep(0.3)


def _subject(api: Api, n: int) -> dict[str, Any]:
    patient = api.hospital.patients[n]
    return {
        "tenant": api.tenant("A"),
        "subject_id": patient.patient_id,
        "identities": {"email": patient.email},
    }


async def test_a_dpo_submits_approves_and_gets_the_certificate(api: Api) -> None:
    async with api.client("dpo-a") as http:
        submitted = await http.post(
            "/v1/erasures", json={"subject": _subject(api, 0), "reason": "Art. 17 by e-mail"}
        )
        assert submitted.status_code == 202, submitted.text
        request_id = submitted.json()["id"]
        assert request_id == api.hospital.workflow_id(api.hospital.patients[0])
        waiting = await _state(api, request_id, "awaiting_approval")
        assert waiting["tenant"] == api.tenant("A")
        assert waiting["requested_by"] == "dpo-a"
        assert waiting["status"]["approval_required"]
        assert {s["kind"] for s in waiting["status"]["steps"]} >= {"sql", "kafka", "redis"}

        planned = await http.get(f"/v1/erasures/{request_id}/plan")
        assert planned.status_code == 200, planned.text
        steps = [step for region in planned.json()["regions"] for step in region["steps"]]
        assert {step["id"] for step in steps} == {s["step_id"] for s in waiting["status"]["steps"]}
        assert all(d["citation"] for step in steps for d in step["decisions"])

        listed = await http.get("/v1/erasures", params={"state": "awaiting_approval"})
        assert listed.status_code == 200
        assert request_id in [r["id"] for r in listed.json()]

        # The certificate is not there while the request runs.
        early = await http.get(f"/v1/erasures/{request_id}/certificate")
        assert early.status_code == 404
        assert early.headers["content-type"] == PROBLEM

        approved = await http.post(f"/v1/erasures/{request_id}/approve", json={"note": "ok"})
        assert approved.status_code == 202, approved.text
        done = await _state(api, request_id, "completed")
        assert done["status"]["approval"]["by"] == "dpo-a"

        certificate = await http.get(f"/v1/erasures/{request_id}/certificate")
        assert certificate.status_code == 200
        body = certificate.json()
        # As in tests/e2e/test_erasure_cli.py: with no window, Kafka's honest answer is
        # `at_risk` (compaction has not run yet), so the outcome is `incomplete`.
        not_done = {s["step_id"]: s["status"] for s in body["steps"] if s["status"] != "done"}
        assert not_done == {"patient-events/0": "at_risk"}, not_done
        assert body["outcome"] == "incomplete"
        assert body["approval"]["by"] == "dpo-a"
        page = await http.get(f"/v1/erasures/{request_id}/certificate.html")
        assert page.status_code == 200
        assert "Certificate of erasure" in page.text
        assert body["request_id"] in page.text
        assert "<script" not in page.text

        # The ledger shows the request's entries, by request id and by action.
        entries = await http.get("/v1/ledger", params={"request_id": body["request_id"]})
        assert entries.status_code == 200
        actions = [e["action"] for e in entries.json()["entries"]]
        assert "erasure.approved" in actions or "erasure.started" in actions
        assert all(e["tenant"] == api.tenant("A") for e in entries.json()["entries"])
        verified = await http.get("/v1/ledger/verify")
        assert verified.json() == {"intact": True, "problems": []}

        # A lookup by POST finds the subject's request and its place on the forget-list.
        found = await http.post("/v1/subjects/lookup", json=_subject(api, 0) | {"identities": None})
        assert found.status_code == 422  # identities are not part of a lookup
        subject = _subject(api, 0)
        del subject["identities"]
        found = await http.post("/v1/subjects/lookup", json=subject)
        assert found.status_code == 200, found.text
        assert found.json()["request"] == request_id
        assert found.json()["forget_listed"] is True

    # Others: the other tenant's DPO and another service get 404, as for nothing at all.
    for name in ("dpo-b", "service-a"):
        async with api.client(name) as http:
            for path in ("", "/certificate", "/certificate.html"):
                answer = await http.get(f"/v1/erasures/{request_id}{path}")
                assert answer.status_code == 404, (name, path, answer.text)
            listed = await http.get("/v1/erasures")
            assert request_id not in [r["id"] for r in listed.json()]
    async with api.client("auditor-all") as http:
        assert (await http.get(f"/v1/erasures/{request_id}")).status_code == 200
        assert (await http.post(f"/v1/erasures/{request_id}/approve", json={})).status_code == 403


async def test_a_service_follows_its_own_request_by_server_sent_events(api: Api) -> None:
    async with api.client("service-a") as http:
        submitted = await http.post("/v1/erasures", json={"subject": _subject(api, 1)})
        assert submitted.status_code == 202, submitted.text
        request_id = submitted.json()["id"]
        events = []
        async with asyncio.timeout(60):
            async with http.stream("GET", f"/v1/erasures/{request_id}/events") as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                async for line in stream.aiter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line.removeprefix("data: ")))
                        if events[-1]["state"] == "awaiting_approval":
                            break
        assert events[-1]["state"] == "awaiting_approval"
        # Approving is a DPO's: the service may not.
        refused = await http.post(f"/v1/erasures/{request_id}/approve", json={})
        assert refused.status_code == 403
        assert refused.headers["content-type"] == PROBLEM
    async with api.client("service-a2") as http:
        assert (await http.get(f"/v1/erasures/{request_id}")).status_code == 404
    async with api.client("dpo-a") as http:
        rejected = await http.post(f"/v1/erasures/{request_id}/reject", json={"note": "dup"})
        assert rejected.status_code == 202
        await _state(api, request_id, "rejected")


async def test_bad_input_is_a_problem_naming_the_field_without_the_value(api: Api) -> None:
    marker = "Zq-SECRET-7731"
    async with api.client("dpo-a") as http:
        answer = await http.post(
            "/v1/erasures",
            json={
                "subject": {
                    "tenant": api.tenant("A"),
                    "subject_id": marker,
                    "identities": {f"Bad Name {marker}": marker},
                }
            },
        )
        assert answer.status_code == 422
        assert answer.headers["content-type"] == PROBLEM
        problem = answer.json()
        assert problem["status"] == 422
        assert [e["field"] for e in problem["errors"]] == ["body.subject.identities"]
        assert marker not in answer.text
        other = await http.post(
            "/v1/erasures",
            json={"subject": {"tenant": api.tenant("B"), "subject_id": marker}},
        )
        assert other.status_code == 403
        assert marker not in other.text
    async with httpx.AsyncClient(base_url=api.base) as anonymous:
        refused = await anonymous.get("/v1/erasures")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert refused.headers["content-type"] == PROBLEM
    assert not [line for line in api.log.lines if marker in line]


async def test_holds_are_placed_and_released_per_tenant(api: Api) -> None:
    async with api.client("dpo-a") as http:
        placed = await http.post(
            "/v1/holds",
            json={
                "matter": "Case 7",
                "scope": "subject",
                "subject": {"tenant": api.tenant("A"), "subject_id": "pt-x"},
                "reason": "litigation",
            },
        )
        assert placed.status_code == 201, placed.text
        hold = placed.json()
        assert hold["tenant"] == api.tenant("A")
        assert "pt-x" not in placed.text
        assert hold["id"] in [h["id"] for h in (await http.get("/v1/holds")).json()]
    async with api.client("dpo-b") as http:
        assert hold["id"] not in [h["id"] for h in (await http.get("/v1/holds")).json()]
        stolen = await http.post(f"/v1/holds/{hold['id']}/release")
        assert stolen.status_code == 404
    async with api.client("dpo-a") as http:
        released = await http.post(f"/v1/holds/{hold['id']}/release")
        assert released.status_code == 200
        assert released.json()["released_by"] == "dpo-a"


async def test_an_admin_makes_and_revokes_tokens(api: Api) -> None:
    async with api.client("admin") as http:
        made = await http.post(
            "/v1/tokens", json={"name": "reporting", "role": "auditor", "days": 1}
        )
        assert made.status_code == 201, made.text
        secret, token = made.json()["secret"], made.json()["token"]
        listed = await http.get("/v1/tokens")
        assert token["id"] in [t["id"] for t in listed.json()]
        assert secret not in listed.text
        refused = await http.post("/v1/tokens", json={"name": "x", "role": "dpo", "days": 1})
        assert refused.status_code == 422  # a dpo token needs a tenant
    headers = {"Authorization": f"Bearer {secret}"}
    async with httpx.AsyncClient(base_url=api.base, headers=headers) as fresh:
        me = await fresh.get("/v1/me")
        assert me.json() == {"name": "reporting", "role": "auditor", "tenant": None}
    async with api.client("admin") as http:
        assert (await http.delete(f"/v1/tokens/{token['id']}")).status_code == 200
    async with httpx.AsyncClient(base_url=api.base, headers=headers) as fresh:
        assert (await fresh.get("/v1/me")).status_code == 401


async def test_no_subject_id_in_any_access_log_line(api: Api) -> None:
    lines = api.log.lines
    assert any("/v1/erasures" in line for line in lines)  # the log is being read
    for patient in api.hospital.patients:
        assert not [line for line in lines if patient.patient_id in line]
        assert not [line for line in lines if patient.email in line]
