"""The sweep planner: a task per locator (or scope), the limit that removes and the obligations
that keep, why a task is kept whole, conflicts naming both rules, and filters that name
nothing."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
import yaml

from lethe.classification.datamap import DataMap
from lethe.plans.retention import UnknownSweepFilter, plan_sweep
from lethe.policies.engine import PolicyConflict
from lethe.policies.model import PACKS_DIR, PolicyPack, load_pack

GDPR = load_pack(PACKS_DIR / "gdpr.yaml")


def _map(tables: list[dict[str, Any]], **system: Any) -> DataMap:
    return DataMap.model_validate(
        {
            "version": 1,
            "regions": ["eu", "us"],
            "tenants": {"st-mary": {"region": "eu"}, "north": {"region": "eu"}},
            "systems": [
                {
                    "name": "db",
                    "kind": "sql",
                    "region": "eu",
                    "connection": "DB_URL",
                    "tables": tables,
                    **system,
                },
                {
                    "name": "cache",
                    "kind": "redis",
                    "region": "eu",
                    "connection": "REDIS_URL",
                    "keys": [
                        {
                            "patterns": ["session:{tenant}:{subject_id}"],
                            "categories": ["user.device"],
                        }
                    ],
                },
            ],
        }
    )


def _pack(*rules: dict[str, Any]) -> PolicyPack:
    return PolicyPack.model_validate(
        {
            "name": "test",
            "version": "1",
            "erasure": {
                "default": {"strategy": "delete", "citation": "GDPR Art. 17(1)"},
                "deadline_months": 1,
                "window": "30d",
            },
            "retention": list(rules),
        }
    )


SESSIONS = {
    "table": "sessions",
    "subject_column": "patient_id",
    "tenant_column": "tenant_id",
    "columns": {"ip": "user.device.ip_address"},
    "retention": {"created": "started_at", "last_activity": "last_seen_at"},
}
DEVICE_LIMIT = {
    "id": "device.limit",
    "category": "user.device",
    "kind": "limit",
    "period": "90d",
    "trigger": "last_activity",
    "citation": "GDPR Art. 5(1)(e)",
}


def test_a_table_under_a_limit_is_one_task_with_the_limit_and_its_dates() -> None:
    plan = plan_sweep(_map([SESSIONS]), _pack(DEVICE_LIMIT))
    sql, cache = plan.tasks
    assert (sql.id, sql.kind, sql.region, sql.kept) == ("db/0", "sql", "eu", None)
    assert sql.limit is not None and sql.limit.rule == "device.limit"
    assert (sql.limit.period, sql.limit.action) == (timedelta(days=90), "delete")
    assert sql.dates == {"created": "started_at", "last_activity": "last_seen_at"}
    assert sql.obligations == [] and sql.scope == [] and sql.tenants == ["north", "st-mary"]
    assert (cache.id, cache.kind, cache.kept) == ("cache/0", "redis", None)  # TTLs are checked
    assert plan.warnings == []


def test_an_obligation_rides_with_the_limit_and_the_longest_comes_first() -> None:
    plan = plan_sweep(
        _map([SESSIONS]),
        _pack(
            DEVICE_LIMIT,
            {
                **DEVICE_LIMIT,
                "id": "audit.short",
                "kind": "obligation",
                "period": "1y",
                "action": None,
            },
            {
                **DEVICE_LIMIT,
                "id": "audit.long",
                "kind": "obligation",
                "period": "2y",
                "trigger": "created",
                "action": None,
            },
        ),
    )
    task = plan.tasks[0]
    assert [term.rule for term in task.obligations] == ["audit.long", "audit.short"]
    assert task.rules == ["device.limit", "audit.long", "audit.short"]
    assert task.kept is None


@pytest.mark.parametrize(
    ("retention", "kept"),
    [
        (None, "gives db/0 no retention dates: add `retention: {last_activity: <field>}`"),
        ({"created": "started_at"}, "counts from last_activity, which the data map does not date"),
    ],
)
def test_a_table_that_cannot_be_judged_is_kept_whole_saying_why(
    retention: dict[str, str] | None, kept: str
) -> None:
    table = {**SESSIONS, "retention": retention}
    task = plan_sweep(_map([table]), _pack(DEVICE_LIMIT)).tasks[0]
    assert task.kept is not None and kept in task.kept


def test_an_obligation_from_a_date_the_table_lacks_keeps_everything() -> None:
    closed = {
        **DEVICE_LIMIT,
        "id": "keep",
        "kind": "obligation",
        "trigger": "closed",
        "action": None,
    }
    task = plan_sweep(_map([SESSIONS]), _pack(DEVICE_LIMIT, closed)).tasks[0]
    assert task.kept is not None and "keep keeps the records from closed" in task.kept


def test_no_limit_means_nothing_is_due() -> None:
    task = plan_sweep(_map([SESSIONS]), _pack()).tasks[0]
    assert task.kept is not None and "no storage limit" in task.kept


def test_a_tenant_scoped_rule_splits_the_table_by_its_tenant_column() -> None:
    scoped = {
        **DEVICE_LIMIT,
        "id": "device.st-mary",
        "period": "30d",
        "where": {"tenant": ["st-mary"]},
    }
    tasks = plan_sweep(_map([SESSIONS]), _pack(DEVICE_LIMIT, scoped)).tasks[:3]
    assert [task.id for task in tasks] == [
        "db/0/tenant=st-mary",
        "db/0/tenant=*",
        "db/0/tenant=null",
    ]
    mary, others, unknown = tasks
    assert mary.limit is not None and mary.limit.rule == "device.st-mary"
    assert [(m.field, m.values) for m in mary.scope] == [("tenant_id", ["st-mary"])]
    assert others.limit is not None and others.limit.rule == "device.limit"
    assert [(m.field, m.others) for m in others.scope] == [("tenant_id", ["st-mary"])]
    # No tenant: the scoped limit is not applied on a guess; the general one still is.
    assert unknown.limit is not None and unknown.limit.rule == "device.limit"
    assert unknown.scope[0].null


def test_a_system_of_one_tenant_gives_that_tenant_to_scoped_rules() -> None:
    table = {k: v for k, v in SESSIONS.items() if k != "tenant_column"}
    scoped = {**DEVICE_LIMIT, "where": {"tenant": ["st-mary"]}}
    task = plan_sweep(_map([table], tenants=["st-mary"]), _pack(scoped)).tasks[0]
    assert task.id == "db/0" and task.limit is not None and task.scope == []


def test_two_limits_on_one_table_that_count_differently_are_a_conflict_naming_both() -> None:
    table = {**SESSIONS, "columns": {"ip": "user.device.ip_address", "pages": "user.behavior"}}
    behavior = {
        **DEVICE_LIMIT,
        "id": "behavior.limit",
        "category": "user.behavior",
        "trigger": "created",
    }
    with pytest.raises(PolicyConflict) as conflict:
        plan_sweep(_map([table]), _pack(DEVICE_LIMIT, behavior))
    message = str(conflict.value)
    assert "'behavior.limit'" in message and "'device.limit'" in message and "db/0" in message


def test_two_limits_that_agree_on_date_and_action_give_the_shortest() -> None:
    table = {**SESSIONS, "columns": {"ip": "user.device.ip_address", "pages": "user.behavior"}}
    behavior = {
        **DEVICE_LIMIT,
        "id": "behavior.limit",
        "category": "user.behavior",
        "period": "30d",
    }
    task = plan_sweep(_map([table]), _pack(DEVICE_LIMIT, behavior)).tasks[0]
    assert task.limit is not None and task.limit.rule == "behavior.limit"


def test_soft_delete_without_a_column_is_a_conflict() -> None:
    soft = {**DEVICE_LIMIT, "action": "soft_delete"}
    with pytest.raises(PolicyConflict, match="no soft_delete_column"):
        plan_sweep(_map([SESSIONS]), _pack(soft))


def test_filters_narrow_the_plan_and_a_filter_naming_nothing_is_refused() -> None:
    datamap, pack = _map([SESSIONS]), _pack(DEVICE_LIMIT)
    assert [t.id for t in plan_sweep(datamap, pack, systems=["cache"]).tasks] == ["cache/0"]
    assert len(plan_sweep(datamap, pack, rules=["device.limit"]).tasks) == 2
    with pytest.raises(
        UnknownSweepFilter, match=re.escape("no retention rule 'nosuch'; its rules: device.limit")
    ):
        plan_sweep(datamap, pack, rules=["nosuch"])
    with pytest.raises(UnknownSweepFilter, match="no system 'nosuch'; its systems: cache, db"):
        plan_sweep(datamap, pack, systems=["nosuch"])


def test_a_rule_no_locator_holds_is_a_warning_not_a_failure() -> None:
    plan = plan_sweep(_map([SESSIONS]), GDPR)
    assert any("gdpr.financial.tax-records" in warning for warning in plan.warnings)
    assert plan.tasks[0].limit is not None
    assert plan.tasks[0].limit.rule == "gdpr.device.storage-limit"


def test_the_sample_hospital_sweeps_its_portal_sessions_under_gdpr() -> None:
    datamap = DataMap.model_validate(
        yaml.safe_load((PACKS_DIR.parent.parent / "examples" / "demo.datamap.yaml").read_text())
    )
    ran = [task for task in plan_sweep(datamap, GDPR).tasks if task.kept is None]
    assert [(task.id, task.limit.rule if task.limit else None) for task in ran] == [
        ("patients-db/3", "gdpr.device.storage-limit")
    ]
