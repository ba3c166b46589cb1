"""Retention in the policy engine: obligations over limits, the longest obligation, the most
specific limit, conflicts naming both rules, and erasure reading the same decisions."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from lethe.classification.datamap import DataMap
from lethe.classification.taxonomy import TAXONOMY
from lethe.contracts import ErasureRequest, Plan, Subject
from lethe.kernel.deadlines import format_duration, parse_duration
from lethe.kernel.yamlfile import InvalidFile
from lethe.plans.planner import Planner
from lethe.policies.engine import PolicyConflict, decide, retention_for
from lethe.policies.model import PACKS_DIR, PolicyPack, RetentionRule, load_pack

GDPR = load_pack(PACKS_DIR / "gdpr.yaml")
HIPAA = load_pack(PACKS_DIR / "hipaa.yaml")
YEAR = timedelta(days=365)

# A GDPR storage limit and US obligations on the same categories: a US clinic with EU patients.
GDPR_HEALTH_LIMIT = {
    "id": "gdpr.health.storage-limit",
    "category": "user.health_and_medical",
    "kind": "limit",
    "period": "2y",
    "trigger": "closed",
    "action": "anonymize",
    "citation": "GDPR Art. 5(1)(e) storage limitation",
}
HIPAA_DOCUMENTATION = {
    "id": "hipaa.documentation",
    "category": "user.health_and_medical",
    "kind": "obligation",
    "period": "6y",
    "trigger": "closed",
    "citation": "45 CFR 164.316(b)(2)(i): six years",
}
GDPR_FINANCIAL_LIMIT = {
    "id": "gdpr.financial.storage-limit",
    "category": "user.financial",
    "kind": "limit",
    "period": "3y",
    "trigger": "created",
    "action": "delete",
    "citation": "GDPR Art. 5(1)(e) storage limitation",
}
SOX_AUDIT_TRAIL = {
    "id": "sox.audit-trail",
    "category": "user.financial",
    "kind": "obligation",
    "period": "7y",
    "trigger": "created",
    "citation": "SOX-style audit trail (17 CFR 210.2-06): seven years",
}


def _pack(*rules: dict[str, Any]) -> PolicyPack:
    """A small pack with these retention rules and GDPR's erasure rules."""
    return PolicyPack.model_validate(
        {
            "name": "test",
            "version": "1",
            "erasure": GDPR.erasure.model_dump(),
            "retention": list(rules),
        }
    )


def _rule(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "test.rule",
        "category": "user.contact",
        "kind": "limit",
        "period": "1y",
        "citation": "GDPR Art. 5(1)(e)",
    }
    return {**base, **fields}


def _write_pack(tmp_path: Path, *rules: dict[str, Any]) -> Path:
    path = tmp_path / "pack.yaml"
    data = {"name": "test", "version": "1", "erasure": {"default": {"citation": "GDPR Art. 17"}}}
    path.write_text(yaml.safe_dump({**data, "retention": list(rules)}, sort_keys=False))
    return path


# --- the shipped packs -------------------------------------------------------------------------


def test_the_hipaa_pack_cites_what_the_law_says() -> None:
    rules = {rule.id: rule for rule in HIPAA.retention}
    record = rules["hipaa.medical-record.state-law"]
    assert record.kind == "obligation" and record.trigger == "closed"
    assert record.citation.startswith("State medical-record retention law, not HIPAA")
    assert "CFR" not in record.citation  # HIPAA sets no period for the medical record
    documentation = rules["hipaa.documentation"]
    assert "164.316(b)(2)(i)" in documentation.citation and "six years" in documentation.citation
    assert documentation.period == 6 * YEAR + timedelta(days=2)  # six calendar years
    assert documentation.period_text == "6y2d"


def test_the_gdpr_pack_has_storage_limits_and_a_tax_obligation() -> None:
    device = retention_for(GDPR, "user.device.ip_address", "eu")
    assert device.keep_at_least is None
    assert device.keep_at_most is not None and device.keep_at_most.id == "gdpr.device.storage-limit"
    assert (device.keep_at_most.period, device.action) == (timedelta(days=90), "delete")
    assert "Art. 5(1)(e)" in device.citations["gdpr.device.storage-limit"]
    tax = retention_for(GDPR, "user.financial.account_number", "eu")
    assert tax.keep_at_least is not None and tax.keep_at_least.id == "gdpr.financial.tax-records"
    assert tax.keep_at_most is None and tax.action is None


# --- precedence --------------------------------------------------------------------------------


def test_a_hipaa_obligation_overrides_a_gdpr_limit_on_the_same_category() -> None:
    pack = _pack(GDPR_HEALTH_LIMIT, HIPAA_DOCUMENTATION)
    decision = retention_for(pack, "user.health_and_medical.lab_result", "eu")
    assert decision.keep_at_least is not None
    assert decision.keep_at_least.id == "hipaa.documentation"
    assert decision.keep_at_most is not None
    assert decision.keep_at_most.id == "gdpr.health.storage-limit"
    assert decision.action == "anonymize"  # the limit's action, once the obligation has ended
    assert decision.rules == ["hipaa.documentation", "gdpr.health.storage-limit"]
    assert set(decision.citations) == set(decision.rules)
    [overridden] = decision.overridden
    assert "gdpr.health.storage-limit" in overridden and "hipaa.documentation" in overridden
    closed = datetime(2026, 1, 1, tzinfo=UTC)
    assert decision.removal_due({"closed": closed}) == closed + 6 * YEAR  # not after 2y
    # Erasure retains under the obligation, whatever the limit says.
    retained = decide(pack, "user.health_and_medical.lab_result", "eu")
    assert (retained.strategy, retained.rule) == ("retain", "hipaa.documentation")


def test_a_sox_obligation_overrides_a_gdpr_limit_on_the_same_category() -> None:
    pack = _pack(GDPR_FINANCIAL_LIMIT, SOX_AUDIT_TRAIL)
    decision = retention_for(pack, "user.financial.payment_card", "us")
    assert decision.keep_at_least is not None and decision.keep_at_least.id == "sox.audit-trail"
    assert decision.keep_at_most is not None
    assert decision.keep_at_most.id == "gdpr.financial.storage-limit"
    assert decision.overridden and "sox.audit-trail" in decision.overridden[0]
    created = datetime(2020, 3, 1, tzinfo=UTC)
    assert decision.removal_due({"created": created}) == created + 7 * YEAR
    assert decide(pack, "user.financial.payment_card", "us").rule == "sox.audit-trail"


def test_a_limit_longer_than_the_obligation_is_not_overridden() -> None:
    pack = _pack(
        {**GDPR_FINANCIAL_LIMIT, "period": "10y"},
        SOX_AUDIT_TRAIL,
    )
    decision = retention_for(pack, "user.financial", "eu")
    assert decision.overridden == []
    created = datetime(2020, 3, 1, tzinfo=UTC)
    assert decision.removal_due({"created": created}) == created + 10 * YEAR


def test_an_obligation_from_a_later_trigger_holds_back_even_a_longer_limit() -> None:
    """`closed` can come years after `created`: the limit waits for the obligation too."""
    pack = _pack(
        {**GDPR_FINANCIAL_LIMIT, "period": "10y"},
        {**SOX_AUDIT_TRAIL, "trigger": "closed"},
    )
    decision = retention_for(pack, "user.financial", "eu")
    assert len(decision.overridden) == 1
    created, closed = datetime(2020, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC)
    due = decision.removal_due({"created": created, "closed": closed})
    assert due == closed + 7 * YEAR  # later than created + 10y


def test_the_longest_obligation_wins() -> None:
    pack = _pack(HIPAA_DOCUMENTATION, {**HIPAA_DOCUMENTATION, "id": "state.law", "period": "10y"})
    decision = retention_for(pack, "user.health_and_medical.diagnosis", "us")
    assert [rule.id for rule in decision.obligations] == ["state.law", "hipaa.documentation"]
    assert decision.keep_at_least is not None and decision.keep_at_least.id == "state.law"
    assert decision.keep_at_most is None and decision.action is None
    assert decision.removal_due({"closed": datetime(2026, 1, 1, tzinfo=UTC)}) is None
    retained = decide(pack, "user.health_and_medical.diagnosis", "us")
    assert retained.rule == "state.law"
    assert retained.exception is not None and "hipaa.documentation" in retained.exception


def test_the_most_specific_limit_wins() -> None:
    pack = _pack(
        _rule(id="contact", period="1y"),
        _rule(id="email", category="user.contact.email", period="30d"),
    )
    email = retention_for(pack, "user.contact.email", "eu")
    assert email.keep_at_most is not None and email.keep_at_most.id == "email"
    assert [rule.id for rule in email.limits] == ["email", "contact"]
    phone = retention_for(pack, "user.contact.phone_number", "eu")
    assert phone.keep_at_most is not None and phone.keep_at_most.id == "contact"


def test_a_limit_naming_the_region_beats_one_for_everywhere() -> None:
    pack = _pack(_rule(id="everywhere", period="1y"), _rule(id="eu", period="90d", regions=["eu"]))
    eu = retention_for(pack, "user.contact.email", "eu").keep_at_most
    us = retention_for(pack, "user.contact.email", "us").keep_at_most
    assert eu is not None and eu.id == "eu"
    assert us is not None and us.id == "everywhere"


def test_a_deeper_category_beats_naming_the_region() -> None:
    pack = _pack(
        _rule(id="eu-contact", period="1y", regions=["eu"]),
        _rule(id="email", category="user.contact.email", period="30d"),
    )
    decision = retention_for(pack, "user.contact.email", "eu")
    assert decision.keep_at_most is not None and decision.keep_at_most.id == "email"


def test_a_limit_with_a_scope_beats_one_without() -> None:
    pack = _pack(_rule(id="all", period="1y"), _rule(id="st-mary", period="2y", where=_ST_MARY))
    decision = retention_for(pack, "user.contact", "eu", {"tenant": "st-mary"})
    assert decision.keep_at_most is not None and decision.keep_at_most.id == "st-mary"


# --- conflicts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "other",
    [{"period": "2y"}, {"action": "anonymize"}, {"trigger": "last_activity"}],
    ids=["period", "action", "trigger"],
)
def test_equally_specific_limits_that_disagree_are_a_conflict_naming_both(
    other: dict[str, str],
) -> None:
    pack = _pack(_rule(id="first", action="delete"), _rule(**{"id": "second", **other}))
    with pytest.raises(PolicyConflict) as caught:
        retention_for(pack, "user.contact.email", "eu")
    assert "'first'" in str(caught.value) and "'second'" in str(caught.value)
    with pytest.raises(PolicyConflict, match="'first' and 'second'"):
        decide(pack, "user.contact.email", "eu")  # erasure reads the same decision


def test_equally_specific_limits_that_agree_are_no_conflict() -> None:
    # No action says delete, as `action: delete` does.
    pack = _pack(_rule(id="first"), _rule(id="second", action="delete"))
    decision = retention_for(pack, "user.contact", "eu")
    assert [rule.id for rule in decision.limits] == ["first", "second"]


def test_limits_in_different_regions_do_not_conflict() -> None:
    pack = _pack(_rule(id="eu", regions=["eu"]), _rule(id="us", period="2y", regions=["us"]))
    eu = retention_for(pack, "user.contact", "eu").keep_at_most
    assert eu is not None and eu.id == "eu"


def test_obligations_never_conflict() -> None:
    pack = _pack(
        {**SOX_AUDIT_TRAIL, "id": "a", "trigger": "closed"},
        {**SOX_AUDIT_TRAIL, "id": "b", "period": "3y"},
    )
    decision = retention_for(pack, "user.financial", "us")
    assert [rule.id for rule in decision.obligations] == ["a", "b"]


MAP = """\
version: 1
regions: [eu, us]
tenants:
  st-mary: {region: eu}
  acme: {region: eu}
systems:
  - name: people
    kind: sql
    region: eu
    connection: EU_SQL
    tables:
      - table: people
        subject_column: person_id
        soft_delete_column: deleted_at
        tenant_column: tenant
        columns: {email: user.contact.email, invoice: user.financial}
"""


def _plan(pack: PolicyPack, tenant: str = "st-mary") -> Plan:
    planner = Planner(DataMap.model_validate(yaml.safe_load(MAP)), pack, "digest")
    request = ErasureRequest(subject=Subject(tenant=tenant, subject_id="p-1"), requested_by="dpo")
    return planner.plan(request, "req-1", "0" * 32)


def test_a_conflict_the_pack_cannot_decide_fails_planning() -> None:
    pack = _pack(_rule(id="first"), _rule(id="second", period="2y"))
    with pytest.raises(PolicyConflict, match="'first' and 'second'"):
        _plan(pack)


# --- which rules apply -------------------------------------------------------------------------


def test_rules_apply_only_in_their_regions() -> None:
    decision = retention_for(HIPAA, "user.health_and_medical.diagnosis", "eu")
    assert decision.obligations == []  # the state law is a US obligation
    us = retention_for(HIPAA, "user.health_and_medical.diagnosis", "us")
    assert [rule.id for rule in us.obligations] == ["hipaa.medical-record.state-law"]


def test_a_rule_on_a_parent_applies_to_its_children_not_the_reverse() -> None:
    record = retention_for(HIPAA, "user.health_and_medical.record_id", "us")
    assert [rule.id for rule in record.obligations] == [
        "hipaa.medical-record.state-law",
        "hipaa.documentation",
    ]
    parent = retention_for(HIPAA, "user.health_and_medical", "us")
    assert [rule.id for rule in parent.obligations] == ["hipaa.medical-record.state-law"]
    assert retention_for(HIPAA, "user.contact", "us").rules == []


_ST_MARY = {"tenant": ["st-mary"]}


def test_a_scoped_rule_applies_to_its_scope_only() -> None:
    pack = _pack({**SOX_AUDIT_TRAIL, "where": _ST_MARY})
    assert retention_for(pack, "user.financial", "eu", {"tenant": "st-mary"}).obligations
    assert retention_for(pack, "user.financial", "eu", {"tenant": "acme"}).obligations == []


def test_an_obligation_scoped_by_a_key_not_given_is_kept_a_limit_is_not_applied() -> None:
    pack = _pack(
        {**SOX_AUDIT_TRAIL, "where": {"state": ["ny"]}},
        {**GDPR_FINANCIAL_LIMIT, "where": {"state": ["ny"]}},
    )
    decision = retention_for(pack, "user.financial", "us", {"tenant": "st-mary"})
    assert [rule.id for rule in decision.obligations] == ["sox.audit-trail"]
    assert decision.keep_at_most is None
    assert set(decision.assumed) == {"sox.audit-trail", "gdpr.financial.storage-limit"}
    assert decision.assumed["sox.audit-trail"].endswith("some state; none given: kept")
    assert decision.assumed["gdpr.financial.storage-limit"].endswith("none given: not applied")
    retained = decide(pack, "user.financial", "us", {"tenant": "st-mary"})
    assert retained.exception is not None and "none given: kept" in retained.exception


def test_erasure_retains_under_a_tenant_scoped_obligation_for_that_tenant_only() -> None:
    contact = {**SOX_AUDIT_TRAIL, "id": "st-mary.contact", "category": "user.contact"}
    pack = _pack({**contact, "where": _ST_MARY})
    kept = _plan(pack).steps[0]
    assert kept.keep_columns == ["email", "invoice"]  # the invoice under GDPR's erasure rule
    assert any(d.rule == "st-mary.contact" for d in kept.decisions)
    other = _plan(pack, tenant="acme").steps[0]
    assert other.keep_columns == ["invoice"]
    assert all(d.rule != "st-mary.contact" for d in other.decisions)


# --- erasure reads the same decisions ----------------------------------------------------------


@pytest.mark.parametrize(
    "pack",
    [GDPR, HIPAA, _pack(GDPR_HEALTH_LIMIT, HIPAA_DOCUMENTATION, GDPR_FINANCIAL_LIMIT)],
    ids=["gdpr", "hipaa", "mixed"],
)
def test_erasure_retains_exactly_what_an_obligation_keeps(pack: PolicyPack) -> None:
    for key in TAXONOMY:
        for region in ("eu", "us"):
            obligations = retention_for(pack, key, region).obligations
            decision = decide(pack, key, region)
            if obligations:
                assert (decision.strategy, decision.rule) == ("retain", obligations[0].id), key
                assert decision.citation == obligations[0].citation
            else:
                assert not any(decision.rule == rule.id for rule in pack.retention), key


# --- the model: spelling and bad input ---------------------------------------------------------


def test_periods_are_durations_and_a_year_is_365_days() -> None:
    assert RetentionRule.model_validate(_rule(period="6y")).period == timedelta(days=2190)
    assert RetentionRule.model_validate(_rule(period="395d")).period_text == "395d"
    assert RetentionRule.model_validate(_rule(period="10y3d")).period_text == "10y3d"
    assert RetentionRule.model_validate(_rule(period=timedelta(days=7))).period_text == "7d"
    assert parse_duration(format_duration(3653 * timedelta(days=1), years=True), years=True) == (
        timedelta(days=3653)
    )


def test_period_days_is_still_read() -> None:
    rule = {k: v for k, v in _rule().items() if k != "period"}
    assert RetentionRule.model_validate({**rule, "period_days": 30}).period == timedelta(days=30)
    with pytest.raises(ValidationError, match="give the period once"):
        RetentionRule.model_validate({**rule, "period_days": 30, "period": "30d"})


def test_years_are_only_for_retention_periods() -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("1y")  # an erasure window or a key rotation is not counted in years
    assert parse_duration("1y", years=True) == YEAR


def test_a_limit_deletes_unless_it_says_and_an_obligation_removes_nothing() -> None:
    assert RetentionRule.model_validate(_rule()).removal == "delete"
    assert RetentionRule.model_validate(_rule(action="soft_delete")).removal == "soft_delete"
    assert RetentionRule.model_validate(_rule(kind="obligation")).removal is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"period": "0d"}, "period 0s is not a length of time: give one above zero"),
        ({"period": "-1d"}, "period -1d is below zero"),
        ({"period": 30}, "period 30 has no unit: say `30d` or `30y`"),
        ({"period": "6 years"}, "'6 years' is not a duration"),
        ({"period": "1M"}, "months are not a fixed length"),
        ({"trigger": "discharged"}, "trigger 'discharged' is not one of created, last_activity"),
        ({"action": "shred"}, "action 'shred' is not one of delete, anonymize, soft_delete"),
        ({"kind": "minimum"}, "kind 'minimum' is not one of obligation, limit"),
        ({"trigger": "encounter_end"}, "trigger `encounter_end` is now `closed`"),
        ({"trigger": "account_closed"}, "trigger `account_closed` is now `closed`"),
        ({"obligation": True}, "`obligation: true` is no longer read: write `kind: obligation`"),
        ({"obligation": False}, "write `kind: limit`"),
        ({"kind": "obligation", "action": "delete"}, "is an obligation (keep at least)"),
        ({"where": {"tenant": []}}, r"where.tenant lists no value"),
        ({"regions": ["eu", "eu"]}, "regions must be distinct"),
        ({"where": {"Ward": ["a"]}}, "where: 'Ward' is not a scope key"),
    ],
)
def test_bad_rules_are_refused_naming_the_rule(
    tmp_path: Path, fields: dict[str, Any], message: str
) -> None:
    path = _write_pack(tmp_path, _rule(id="acme.contact.limit", **fields))
    with pytest.raises(InvalidFile) as caught:
        load_pack(path)
    text = str(caught.value)
    assert message in text
    assert "acme.contact.limit" in text and f"{path}:" in text and "retention[0]" in text


def test_a_negative_period_in_days_is_refused_naming_the_rule() -> None:
    rule = {k: v for k, v in _rule(id="acme.short").items() if k != "period"}
    with pytest.raises(
        ValidationError, match=re.escape("'acme.short': period -5d is not a length")
    ):
        RetentionRule.model_validate({**rule, "period_days": -5})


def test_a_rule_without_a_kind_is_told_to_say_which(tmp_path: Path) -> None:
    rule = {k: v for k, v in _rule(id="acme.nokind").items() if k != "kind"}
    with pytest.raises(
        InvalidFile, match=re.escape("'acme.nokind' says neither `kind: obligation`")
    ):
        load_pack(_write_pack(tmp_path, rule))


def test_two_rules_with_one_id_are_refused() -> None:
    with pytest.raises(ValidationError, match=re.escape("test.rule used twice")):
        _pack(_rule(), _rule(period="2y"))
