"""The `keys` system kind: the data map validates it, policy shreds it, and `shred` stays there."""

from __future__ import annotations

from pathlib import Path

import pytest

from lethe.classification.datamap import KeysLocator, load_datamap
from lethe.contracts import ErasureRequest, Plan, Step, Subject
from lethe.kernel.yamlfile import InvalidFile
from lethe.plans.planner import Planner
from lethe.policies.engine import PolicyConflict
from lethe.policies.model import PACKS_DIR, PolicyPack, load_pack

REF = "0" * 32
MAP = """\
version: 1
regions: [eu, us]
tenants:
  acme: {region: eu}
  acme-us: {region: us}
systems:
  - name: crm
    kind: sql
    region: eu
    connection: CRM_URL
    tables:
      - table: people
        subject_column: id
        soft_delete_column: deleted_at
        columns:
          email: user.contact.email
  - name: patient-keys
    kind: keys
    region: eu
    connection: LETHE_KEYS_STORE_URL
    categories: [user.contact, user.health_and_medical]
  - name: us-keys
    kind: keys
    region: us
    connection: US_KEYS_STORE_URL
    categories: [user.health_and_medical.diagnosis]
"""


def _write(tmp_path: Path, text: str, name: str = "map.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _plan(
    tmp_path: Path, pack: PolicyPack | str = "gdpr", text: str = MAP, tenant: str = "acme"
) -> Plan:
    if isinstance(pack, str):
        pack = load_pack(PACKS_DIR / f"{pack}.yaml")
    planner = Planner(load_datamap(_write(tmp_path, text)), pack, "digest")
    request = ErasureRequest(subject=Subject(tenant=tenant, subject_id="p-1"), requested_by="dpo")
    return planner.plan(request, "req-1", REF)


def _step(plan: Plan, step_id: str) -> Step:
    return next(step for step in plan.steps if step.id == step_id)


def test_a_keys_system_is_shredded_in_the_immediate_phase(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    keys = _step(plan, "patient-keys/0")
    assert (keys.kind, keys.action, keys.phase) == ("keys", "shred", "immediate")
    assert keys.connection == "LETHE_KEYS_STORE_URL"
    assert isinstance(keys.locator, KeysLocator)
    assert keys.locator.categories == ["user.contact", "user.health_and_medical"]
    # The rules behind it are the categories' own (soft delete, pseudonymise): shredding the keys
    # is how a key store erases them.
    assert {d.rule for d in keys.decisions} == {
        "gdpr.contact.soft-delete",
        "gdpr.health.pseudonymise",
    }
    # The US key store holds only acme-us's subjects: an acme erasure plans nothing there.
    assert [r.region for r in plan.regions] == ["eu"]
    us_plan = _plan(tmp_path, tenant="acme-us")
    assert _step(us_plan, "us-keys/0").action == "shred"
    assert [r.region for r in us_plan.regions] == ["us"]


def test_a_keys_step_survives_the_trip_through_a_payload(tmp_path: Path) -> None:
    keys = _step(_plan(tmp_path), "patient-keys/0")
    again = Step.model_validate_json(keys.model_dump_json())
    assert again == keys
    assert isinstance(again.locator, KeysLocator)


def test_a_retention_obligation_keeps_the_keys(tmp_path: Path) -> None:
    """HIPAA keeps US medical records: their keys stay, or the records would be destroyed."""
    plan = _plan(tmp_path, "hipaa")
    us_keys = _step(_plan(tmp_path, "hipaa", tenant="acme-us"), "us-keys/0")
    assert us_keys.action == "retain"
    assert us_keys.decisions[0].rule == "hipaa.medical-record.state-law"
    # In the EU the medical record is restricted (retained) under HIPAA's erasure rule.
    assert _step(plan, "patient-keys/0").action == "retain"


def test_a_shred_rule_applies_to_keys_systems(tmp_path: Path) -> None:
    gdpr = load_pack(PACKS_DIR / "gdpr.yaml")
    text = MAP.replace("categories: [user.contact, user.health_and_medical]", "categories: [user]")
    rule = {
        "id": "gdpr.sealed.shred",
        "category": "user.biometric",
        "strategy": "shred",
        "citation": "GDPR Art. 17(1)",
    }
    rules = [*gdpr.erasure.model_dump()["rules"], rule]
    pack = PolicyPack.model_validate(
        {**gdpr.model_dump(), "erasure": {**gdpr.erasure.model_dump(), "rules": rules}}
    )
    assert _step(_plan(tmp_path, pack, text), "patient-keys/0").action == "shred"


@pytest.mark.parametrize(
    ("category", "where"),
    [("user.contact.email", "crm/people"), ("user.contact", "events/0")],
)
def test_a_rule_that_shreds_data_held_in_clear_is_a_clear_error(
    tmp_path: Path, category: str, where: str
) -> None:
    gdpr = load_pack(PACKS_DIR / "gdpr.yaml")
    rules = [
        rule.model_dump()
        if rule.category != "user.contact"
        else {**rule.model_dump(), "strategy": "shred", "id": "gdpr.contact.shred"}
        for rule in gdpr.erasure.rules
    ]
    pack = PolicyPack.model_validate(
        {**gdpr.model_dump(), "erasure": {**gdpr.erasure.model_dump(), "rules": rules}}
    )
    text = MAP + (
        "  - name: events\n    kind: kafka\n    region: eu\n    connection: KAFKA\n"
        "    topics:\n      - topic: profiles\n        key_template: 'p:{subject_id}'\n"
        f"        categories: [{category}]\n"
    )
    if where.startswith("events"):
        text = text.replace("email: user.contact.email", "email: user.financial")
    with pytest.raises(PolicyConflict) as caught:
        _plan(tmp_path, pack, text)
    message = str(caught.value)
    assert "gdpr.contact.shred" in message
    assert f"that {where} holds in clear" in message
    assert "applies only to a `keys` system" in message


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "categories: [user.contact, user.health_and_medical]",
            "categories: []",
            r"map.yaml:\d+: systems\[1\].*categories",
        ),
        (
            "categories: [user.contact, user.health_and_medical]",
            "categories: [user.contact.emial]",
            "closest known key is 'user.contact'",
        ),
        (
            "connection: LETHE_KEYS_STORE_URL",
            "connection: postgresql+psycopg://u:pw@h/keys",
            r"map.yaml:\d+: systems\[1\].*connection",
        ),
        ("    categories: [user.contact, user.health_and_medical]\n", "", "categories"),
        (
            "name: us-keys\n    kind: keys\n    region: us",
            "name: us-keys\n    kind: keys\n    region: mars",
            "not one of the regions",
        ),
        (
            "          email: user.contact.email\n",
            "          email: user.contact.email\n        strategy: shred\n",
            "applies only to a `keys` system",
        ),
        (
            "    categories: [user.contact, user.health_and_medical]\n",
            "    categories: [user.contact]\n    tables: []\n",
            "tables",
        ),
    ],
)
def test_a_bad_keys_system_names_file_line_and_problem(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    assert old in MAP
    with pytest.raises(InvalidFile, match=expected) as caught:
        load_datamap(_write(tmp_path, MAP.replace(old, new, 1)))
    assert "pw@h" not in str(caught.value)
