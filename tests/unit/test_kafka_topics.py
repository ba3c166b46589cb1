"""How the data map says a Kafka topic holds the subject, and how each way is planned.

By key (a tombstone for the rendered key), by a field of the value (tombstones for the keys of
the subject's records), or not per subject at all: left to the topic's retention, or erased by
crypto-shredding in a keys system. Never a tombstone for a key nobody wrote.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lethe.classification.datamap import load_datamap
from lethe.contracts import ErasureRequest, Plan, Step, Subject
from lethe.kernel.yamlfile import InvalidFile
from lethe.plans.planner import Planner, PlanningFailed
from lethe.policies.model import PACKS_DIR, load_pack

REF = "0" * 32
GDPR = load_pack(PACKS_DIR / "gdpr.yaml")
HEAD = """\
version: 1
regions: [eu]
tenants:
  acme: {region: eu}
  beta: {region: eu}
systems:
  - name: patient-keys
    kind: keys
    region: eu
    connection: KEYS_URL
    categories: [user.health_and_medical]
  - name: events
    kind: kafka
    region: eu
    connection: KAFKA
    tenants: [acme]
    topics:
"""
TOPICS = """\
      - topic: profile
        key_template: "patient:{subject_id}"
        categories: [user.contact]
      - topic: claims
        value_field: member.id
        categories: [user.behavior]
      - topic: audit-trail
        removal: retention
        categories: [user.account]
      - topic: notes
        removal: crypto_shred
        shredded_by: patient-keys
        categories: [user.health_and_medical.encounter]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "map.yaml"
    path.write_text(text)
    return path


def _plan(tmp_path: Path, topics: str = TOPICS, head: str = HEAD) -> Plan:
    planner = Planner(load_datamap(_write(tmp_path, head + topics)), GDPR, "digest")
    request = ErasureRequest(subject=Subject(tenant="acme", subject_id="p-1"), requested_by="dpo")
    return planner.plan(request, "req-1", REF)


def _step(plan: Plan, step_id: str) -> Step:
    return next(step for step in plan.steps if step.id == step_id)


def test_each_way_of_holding_the_subject_gets_its_own_action(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    assert _step(plan, "events/0").action == "tombstone"
    assert _step(plan, "events/1").action == "tombstone"
    expire = _step(plan, "events/2")
    assert (expire.action, expire.phase) == ("expire", "immediate")
    # The encrypted topic is no Kafka step: the keys system's shred step erases it, and says so.
    assert "events/3" not in {step.id for step in plan.steps}
    keys = _step(plan, "patient-keys/0")
    assert keys.action == "shred"
    assert keys.covers == ["events/3: Kafka topic 'notes', encrypted under the subject's keys"]


@pytest.mark.parametrize(
    ("topic", "problem"),
    [
        ("{topic: t, categories: [user]}", "give one of key_template, value_field or removal"),
        (
            '{topic: t, key_template: "k:{subject_id}", value_field: id, categories: [user]}',
            "give one of key_template, value_field or removal",
        ),
        ("{topic: t, removal: crypto_shred, categories: [user]}", "needs shredded_by"),
        (
            "{topic: t, removal: retention, shredded_by: patient-keys, categories: [user]}",
            "shredded_by only goes with removal: crypto_shred",
        ),
        ('{topic: t, value_field: "a..b", categories: [user]}', "value_field"),
        ("{topic: t, value_field: id, value_template: fixed, categories: [user]}", "placeholder"),
    ],
)
def test_a_topic_must_say_exactly_one_way_the_subject_is_found(
    tmp_path: Path, topic: str, problem: str
) -> None:
    with pytest.raises(InvalidFile, match=problem):
        load_datamap(_write(tmp_path, HEAD + f"      - {topic}\n"))


def test_shredded_by_must_name_a_keys_system_of_the_map(tmp_path: Path) -> None:
    topic = "      - {topic: t, removal: crypto_shred, shredded_by: events, categories: [user]}\n"
    with pytest.raises(InvalidFile, match="'events', which is not a keys system"):
        load_datamap(_write(tmp_path, HEAD + topic))


def test_a_topic_of_several_tenants_found_by_value_needs_the_tenant(tmp_path: Path) -> None:
    shared = HEAD.replace("    tenants: [acme]\n", "    tenants: [acme, beta]\n")
    by_value = "      - {topic: t, value_field: member, categories: [user]}\n"
    with pytest.raises(InvalidFile, match="give it a tenant_field"):
        load_datamap(_write(tmp_path, shared + by_value))
    with_tenant = "      - {topic: t, value_field: member, tenant_field: org, categories: [user]}\n"
    load_datamap(_write(tmp_path, shared + with_tenant))
    # Retention and keys do not tell subjects apart, so tenants need nothing there.
    by_age = "      - {topic: t, removal: retention, categories: [user]}\n"
    load_datamap(_write(tmp_path, shared + by_age))


def test_a_value_template_needing_an_identity_the_request_lacks_fails_planning(
    tmp_path: Path,
) -> None:
    topic = (
        "      - {topic: t, value_field: email, value_template: '{identity.email}', "
        "categories: [user.contact]}\n"
    )
    with pytest.raises(PlanningFailed, match=r"events/0 needs \{identity.email\}"):
        _plan(tmp_path, topic)


def test_a_topic_shredded_by_keys_the_subjects_tenant_lacks_fails_planning(
    tmp_path: Path,
) -> None:
    head = HEAD.replace(
        "    connection: KEYS_URL\n", "    connection: KEYS_URL\n    tenants: [beta]\n"
    )
    with pytest.raises(PlanningFailed, match="patient-keys, which holds no keys of tenant 'acme'"):
        _plan(tmp_path, TOPICS, head)
