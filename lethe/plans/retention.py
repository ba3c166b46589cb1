"""The retention planner: the data map and the policy pack turn into sweep tasks, touching
nothing.

Each locator with personal data becomes one task, or one per scope when rules are narrowed by a
field the locator maps (`where: {tenant: [st-mary]}` and `scopes: {tenant: tenant_id}`): the
rows of each listed value, those of any other value, and those with none. A task carries the
storage limit that removes its records and every obligation that keeps them; a record goes only
once all of them have ended, by the limit's action. Where nothing can be removed safely (no
limit applies, the limit's date is not mapped, an obligation counts from a date the locator does
not give) the task says why in `kept` and no activity runs for it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence

from lethe.classification.datamap import (
    DataMap,
    KafkaTopicLocator,
    KeysSystem,
    PlacedLocator,
    RedisLocator,
    SqlTableLocator,
)
from lethe.classification.taxonomy import matches
from lethe.contracts import RuleTerm, ScopeMatch, SweepPlan, SweepTask
from lethe.kernel.errors import LetheError
from lethe.policies.engine import PolicyConflict, retention_for
from lethe.policies.model import PolicyPack, RetentionRule


class UnknownSweepFilter(LetheError):
    """`--rule` or `--system` names nothing the pack or the data map has."""


def term(rule: RetentionRule) -> RuleTerm:
    """A rule as a sweep task carries it."""
    return RuleTerm(
        rule=rule.id,
        category=rule.category,
        kind=rule.kind,
        period=rule.period,
        trigger=rule.trigger,
        action=rule.removal,
        citation=rule.citation,
    )


def plan_sweep(
    datamap: DataMap,
    pack: PolicyPack,
    *,
    rules: Sequence[str] = (),
    systems: Sequence[str] = (),
) -> SweepPlan:
    """Every sweep task of the data map under the pack, narrowed to `rules` and `systems` when
    given. PolicyConflict (naming both rules) when two limits on one locator disagree, or a
    limit asks for an action the locator cannot take; UnknownSweepFilter for a filter that
    names nothing."""
    _check_filters(datamap, pack, rules, systems)
    tasks: list[SweepTask] = []
    for placed in datamap.locators():
        system = placed.system
        if isinstance(system, KeysSystem) or (systems and system.name not in systems):
            continue
        for task in _tasks(datamap, pack, placed):
            if not rules or any(rule in rules for rule in task.rules):
                tasks.append(task)
    return SweepPlan(pack=pack.label, tasks=tasks, warnings=_unheld_rules(datamap, pack, rules))


def _check_filters(
    datamap: DataMap, pack: PolicyPack, rules: Sequence[str], systems: Sequence[str]
) -> None:
    known_rules = {rule.id for rule in pack.retention}
    for rule in rules:
        if rule not in known_rules:
            raise UnknownSweepFilter(
                f"the policy pack {pack.label} has no retention rule {rule[:80]!r}; its rules: "
                + (", ".join(sorted(known_rules)) or "none")
            )
    known_systems = {system.name for system in datamap.systems}
    for name in systems:
        if name not in known_systems:
            raise UnknownSweepFilter(
                f"the data map has no system {name[:80]!r}; its systems: "
                + ", ".join(sorted(known_systems))
            )


def _unheld_rules(datamap: DataMap, pack: PolicyPack, only: Sequence[str]) -> list[str]:
    """A warning for each rule whose category no locator holds."""
    held = {key for placed in datamap.locators() for key in _categories(placed)}
    return [
        f"retention rule {rule.id!r}: no locator of the data map holds {rule.category} or a "
        "category under it, so no sweep applies it"
        for rule in pack.retention
        if (not only or rule.id in only) and not any(matches(rule.category, key) for key in held)
    ]


def _categories(placed: PlacedLocator) -> list[str]:
    locator = placed.locator
    if isinstance(locator, SqlTableLocator):
        return locator.categories
    return sorted(set(locator.categories))


def _scope_fields(placed: PlacedLocator) -> dict[str, str]:
    """Scope key -> the field holding it: the map's `scopes`, and a table's `tenant_column` as
    the `tenant` scope unless the map names another."""
    fields = dict(placed.retention.scopes) if placed.retention else {}
    locator = placed.locator
    if isinstance(locator, SqlTableLocator) and locator.tenant_column and "tenant" not in fields:
        fields["tenant"] = locator.tenant_column
    return fields


def _segments(
    pack: PolicyPack, placed: PlacedLocator, holders: list[str]
) -> list[tuple[str, dict[str, str], list[ScopeMatch]]]:
    """The parts of a locator that rules judge differently: (id suffix, scope for the policy
    engine, the matches selecting its records)."""
    categories = _categories(placed)
    fields = _scope_fields(placed)
    constant = {"tenant": holders[0]} if len(holders) == 1 and "tenant" not in fields else {}
    listed: dict[str, list[str]] = {}
    for rule in pack.retention:
        if not any(matches(rule.category, key) for key in categories):
            continue
        for key, values in rule.where.items():
            if key in fields:
                listed.setdefault(key, [])
                listed[key] += [v for v in values if v not in listed[key]]
    if not listed:
        return [("", constant, [])]
    options: list[list[tuple[str, dict[str, str], ScopeMatch]]] = []
    for key in sorted(listed):
        values, field = listed[key], fields[key]
        per_key = [
            (f"{key}={v}", {key: v}, ScopeMatch(key=key, field=field, values=[v])) for v in values
        ]
        # Any other value: the rules naming values do not apply to it.
        per_key.append(
            (f"{key}=*", {key: ""}, ScopeMatch(key=key, field=field, others=list(values)))
        )
        # No value: the engine decides on the safe side (obligations kept, limits not applied).
        per_key.append((f"{key}=null", {}, ScopeMatch(key=key, field=field, null=True)))
        options.append(per_key)
    segments = []
    for combination in itertools.product(*options):
        scope = dict(constant)
        for _, part, _ in combination:
            scope.update(part)
        suffix = ",".join(name for name, _, _ in combination)
        segments.append((suffix, scope, [match for _, _, match in combination]))
    return segments


def _tasks(datamap: DataMap, pack: PolicyPack, placed: PlacedLocator) -> list[SweepTask]:
    system = placed.system
    holders = datamap.holders(system)
    index = placed.path[-1]
    base = f"{system.name}/{index}"
    tasks = []
    for suffix, scope, matches_ in _segments(pack, placed, holders):
        task_id = f"{base}/{suffix}" if suffix else base
        limit, obligations = _terms(pack, placed, system.region, scope, task_id)
        dates = dict(placed.retention.triggers) if placed.retention else {}
        task = SweepTask(
            id=task_id,
            system=system.name,
            kind=system.kind,
            region=system.region,
            connection=system.connection,
            locator=placed.locator,
            tenants=holders,
            categories=_categories(placed),
            scope=matches_,
            limit=limit,
            obligations=obligations,
            dates=dates,
            nulls=placed.retention.nulls if placed.retention else "report",
        )
        tasks.append(task.model_copy(update={"kept": _kept(task, placed)}))
    return tasks


def _terms(
    pack: PolicyPack, placed: PlacedLocator, region: str, scope: Mapping[str, str], where: str
) -> tuple[RuleTerm | None, list[RuleTerm]]:
    """The limit that removes the locator's records and every obligation keeping them."""
    obligations: dict[str, RetentionRule] = {}
    limits: dict[str, RetentionRule] = {}
    for key in _categories(placed):
        decision = retention_for(pack, key, region, scope)
        obligations.update((rule.id, rule) for rule in decision.obligations)
        if decision.keep_at_most is not None:
            limits[decision.keep_at_most.id] = decision.keep_at_most
    ordered = sorted(obligations.values(), key=lambda rule: (-rule.period, rule.id))
    return _one_limit(list(limits.values()), where), [term(rule) for rule in ordered]


def _one_limit(limits: Iterable[RetentionRule], where: str) -> RuleTerm | None:
    """The limit a record-level sweep applies: the shortest, where all count from one date and
    act alike; PolicyConflict naming two that do not (a sweep removes whole records)."""
    ordered = sorted(limits, key=lambda rule: (rule.period, rule.id))
    if not ordered:
        return None
    first = ordered[0]
    for other in ordered[1:]:
        if (other.trigger, other.removal) != (first.trigger, first.removal):
            raise PolicyConflict(
                f"retention limits {first.id!r} ({first.removal} after {first.trigger}) and "
                f"{other.id!r} ({other.removal} after {other.trigger}) both apply to {where}, "
                "whose records a sweep removes whole: give the locator's categories limits "
                "that count from one date and act alike, or map the data to separate locators"
            )
    return term(first)


def _kept(task: SweepTask, placed: PlacedLocator) -> str | None:
    """Why the task removes nothing, or None when it can run.

    A topic and a cache expire records themselves (retention.ms, TTLs): their tasks check those
    settings against every rule, so they run while any rule applies. Elsewhere a task runs only
    with a limit whose date, and every obligation's date, the locator gives. Only a table can
    soft-delete or anonymise a record; elsewhere a limit removes it (which goes further)."""
    limit, locator = task.limit, placed.locator
    if isinstance(locator, RedisLocator | KafkaTopicLocator):
        if limit is None and not task.obligations:
            return f"no retention rule of the pack applies to {', '.join(task.categories)} here"
        return None
    if limit is None:
        return (
            f"no storage limit of the pack applies to {', '.join(task.categories)} here: "
            "nothing is due"
        )
    no_column = isinstance(locator, SqlTableLocator) and locator.soft_delete_column is None
    if limit.action == "soft_delete" and no_column:
        raise PolicyConflict(
            f"retention limit {limit.rule!r} asks to soft-delete rows of {task.id}, but the "
            "data map gives the table no soft_delete_column"
        )
    if not task.dates:
        return (
            f"{limit.rule} applies, but the data map gives {task.id} no retention dates: add "
            f"`retention: {{{limit.trigger}: <field>}}` to the locator"
        )
    if limit.trigger not in task.dates:
        return (
            f"{limit.rule} counts from {limit.trigger}, which the data map does not date for "
            f"{task.id} (it gives {', '.join(task.dates)}): nothing is removed"
        )
    for obligation in task.obligations:
        if obligation.trigger not in task.dates:
            return (
                f"{obligation.rule} keeps the records from {obligation.trigger}, which the data "
                f"map does not date for {task.id}, so its end cannot be known: all kept"
            )
    return None
