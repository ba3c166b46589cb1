"""Planning: policy decisions, precedence, routing, and requests that cannot be planned."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from lethe.classification.datamap import SqlTableLocator
from lethe.classification.routing import UnknownTenant
from lethe.contracts import ErasureRequest, Plan, Step, Subject
from lethe.kernel.errors import UnknownRegion
from lethe.plans.planner import Planner, PlanningFailed
from lethe.policies.engine import decide, locator_action, sql_action
from lethe.policies.model import PACKS_DIR, ErasureRule, load_pack

ROOT = Path(__file__).resolve().parents[2]
DATAMAP = ROOT / "examples" / "datamap.yaml"
GDPR = load_pack(PACKS_DIR / "gdpr.yaml")
HIPAA = load_pack(PACKS_DIR / "hipaa.yaml")
REF = "0" * 32


def _plan(pack: str = "gdpr", **subject: object) -> Plan:
    planner = Planner.from_files(DATAMAP, PACKS_DIR / f"{pack}.yaml")
    fields: dict[str, object] = {
        "tenant": "st-mary",
        "subject_id": "p-1",
        "identities": {"email": "a@b.org"},
    }
    fields.update(subject)
    request = ErasureRequest(subject=Subject.model_validate(fields), requested_by="dpo")
    return planner.plan(request, "req-1", REF)


def _step(plan: Plan, step_id: str) -> Step:
    return next(step for step in plan.steps if step.id == step_id)


def test_most_specific_erasure_rule_wins() -> None:
    assert decide(GDPR, "user.contact.email", "eu").rule == "gdpr.contact.soft-delete"
    assert (
        decide(GDPR, "user.health_and_medical.lab_result", "eu").rule == "gdpr.health.pseudonymise"
    )
    assert decide(GDPR, "user.device.ip_address", "eu").rule == "gdpr.default"


def test_retention_obligation_beats_erasure_and_longest_wins() -> None:
    decision = decide(HIPAA, "user.health_and_medical.record_id", "us")
    assert decision.strategy == "retain"
    assert decision.rule == "hipaa.medical-record.state-law"  # 3653 days beats 2192
    assert decide(GDPR, "user.financial.account_number", "eu").strategy == "retain"


def test_obligations_apply_only_in_their_regions() -> None:
    decision = decide(HIPAA, "user.health_and_medical.diagnosis", "eu")
    assert decision.rule == "hipaa.medical-record.restrict"  # the erasure rule, not the US law


def test_gdpr_plan_soft_deletes_patients_and_pseudonymises_lab_results() -> None:
    plan = _plan()
    patients = _step(plan, "patients-db/0")
    assert patients.action == "soft_delete"
    assert patients.keep_columns == []
    # Visits and results stay linked to the patient: pseudonymised, and named so.
    assert _step(plan, "patients-db/1").action == "pseudonymize"
    assert _step(plan, "patients-db/2").action == "pseudonymize"
    assert _step(plan, "patient-events/0").action == "tombstone"
    assert _step(plan, "session-cache/0").action == "purge"
    assert _step(plan, "app-logs/0").action == "redact"  # soft_delete of contacts keeps records
    assert {s.phase for s in plan.steps if s.kind in ("blob", "logs")} == {"deferred"}
    assert plan.approval_required  # it touches health data, a special category
    assert "user.health_and_medical" in plan.approval_reason


def test_hipaa_plan_restricts_the_medical_record_and_keeps_it() -> None:
    plan = _plan("hipaa")
    patients = _step(plan, "patients-db/0")
    assert patients.action == "soft_delete"
    assert patients.keep_columns == ["mrn"]
    assert _step(plan, "patients-db/1").action == "retain"
    retained = _step(plan, "patients-db/1").decisions[0]
    assert retained.exception and "164.501" in retained.exception
    assert plan.approval_required and "every erasure" in plan.approval_reason


def test_every_step_names_the_rules_behind_it() -> None:
    for step in _plan().steps:
        assert step.decisions
        assert all(d.rule and d.citation for d in step.decisions)


def test_steps_are_grouped_by_region() -> None:
    plan = _plan()
    assert [r.region for r in plan.regions] == ["eu"]
    assert plan.home_region == "eu"
    assert plan.policy == "gdpr@2026.11"


def test_unknown_tenant_is_an_error() -> None:
    with pytest.raises(UnknownTenant, match="'nobody'"):
        _plan(tenant="nobody")


def test_unknown_region_is_an_error_never_a_default() -> None:
    planner = Planner.from_files(DATAMAP, PACKS_DIR / "gdpr.yaml")
    request = ErasureRequest(
        subject=Subject(tenant="st-mary", subject_id="p-1"), region="mars", requested_by="dpo"
    )
    with pytest.raises(UnknownRegion, match="'mars'"):
        planner.plan(request, "req-1", REF)


def test_a_missing_identity_fails_planning_without_naming_the_subject() -> None:
    with pytest.raises(PlanningFailed, match=r"\{identity.email\}") as caught:
        _plan(identities={})
    assert "p-1" not in str(caught.value)


# --- anonymise or pseudonymise ---------------------------------------------------------------


def _table(**fields: object) -> SqlTableLocator:
    return SqlTableLocator.model_validate(
        {
            "table": "visits",
            "subject_column": "patient_id",
            "columns": {"notes": "user.health_and_medical.encounter", "invoice": "user.financial"},
            **fields,
        }
    )


def test_gdpr_health_rule_pseudonymises_and_cites_it_as_personal_data() -> None:
    decision = decide(GDPR, "user.health_and_medical.encounter", "eu")
    assert (decision.rule, decision.strategy) == ("gdpr.health.pseudonymise", "pseudonymize")
    assert "Art. 4(5)" in decision.citation and "Art. 17(3)(c)" in decision.citation
    assert decision.exception and "Art. 17(3)(c)" in decision.exception
    # Never the claim that the kept rows are anonymous (outside the GDPR).
    assert "anonymous" not in decision.citation + decision.exception


def test_kept_columns_without_a_soft_delete_column_are_pseudonymised_not_anonymised() -> None:
    """The retained invoice keeps the row, and its link to the subject: pseudonymisation."""
    locator = _table(columns={"notes": "user.health_and_medical", "invoice": "user.financial"})
    decisions = {c: decide(GDPR, k, "eu") for c, k in locator.columns.items()}
    action, kept, _ = sql_action("clinic", locator, decisions)
    assert (action, kept) == ("pseudonymize", ["invoice"])
    anonymising = {"notes": decisions["notes"].model_copy(update={"strategy": "anonymize"})}
    action, kept, _ = sql_action(
        "clinic", locator, {**anonymising, "invoice": decisions["invoice"]}
    )
    assert (action, kept) == ("pseudonymize", ["invoice"])
    with_mark = _table(soft_delete_column="deleted_at")
    assert sql_action("clinic", with_mark, decisions)[0] == "soft_delete"


def test_strategies_map_to_their_own_actions() -> None:
    notes = _table(columns={"notes": "user.health_and_medical.encounter"})
    decisions = {"notes": decide(GDPR, "user.health_and_medical.encounter", "eu")}
    assert sql_action("clinic", notes, decisions)[0] == "pseudonymize"
    for strategy in ("anonymize", "pseudonymize", "delete"):
        assert sql_action("clinic", _table(strategy=strategy), decisions)[0] == strategy
    # A table that must be soft-deleted for one column is, whatever another asks.
    mixed = _table(
        soft_delete_column="deleted_at",
        columns={"notes": "user.health_and_medical.encounter", "email": "user.contact.email"},
    )
    mixed_decisions = {c: decide(GDPR, k, "eu") for c, k in mixed.columns.items()}
    assert sql_action("clinic", mixed, mixed_decisions)[0] == "soft_delete"
    # Logs keep their records (redacted) for pseudonymised data too.
    logs_action, _ = locator_action("logs", None, [decisions["notes"]])
    assert logs_action == "redact"


def test_a_pseudonymize_rule_must_name_its_exception() -> None:
    with pytest.raises(ValidationError, match="`pseudonymize` rule keeps personal data"):
        ErasureRule(
            id="x.health",
            category="user.health_and_medical",
            strategy="pseudonymize",
            citation="GDPR Art. 4(5)",
        )
