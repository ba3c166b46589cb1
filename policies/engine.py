"""The policy engine: how long each category is kept, what erasure may do to it and to each
locator, and why.

Precedence: a legal hold > a retention obligation (keep at least) > a storage limit (keep at
most) or an erasure rule > the pack's default. A hold lives in Lethe's store, so it is checked
when a step runs, never here: no decision of this module carries one. Among obligations the
longest wins; among limits and among erasure rules the most specific wins. Erasure and the
retention sweep read the same decisions (`retention_for`), so an erasure never removes what an
obligation keeps. Every decision names the rule that made it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from pydantic import BaseModel, ConfigDict

from lethe.classification.datamap import SqlTableLocator, Strategy, SystemKind, TopicRemoval
from lethe.classification.taxonomy import matches, specificity
from lethe.contracts import Action, Decision, RetentionAction
from lethe.kernel.errors import LetheError
from lethe.policies.model import PolicyPack, RetentionRule, Trigger

# How much of the data a strategy keeps: when a locator's categories disagree, the one that
# keeps the most wins, because a reason to keep (a law) outweighs a reason to erase. A
# pseudonymised row keeps its link to the subject (still personal data); an anonymised one does
# not.
_KEEPS_MORE: dict[str, int] = {
    "retain": 6,
    "soft_delete": 5,
    "pseudonymize": 4,
    "anonymize": 3,
    "shred": 2,
    "tombstone": 1,
    "expire": 1,
    "purge": 1,
    "delete": 0,
}


class PolicyConflict(LetheError):
    """The policy asks for something the data map cannot do (e.g. soft delete with no column)."""


def _refuse_shred(where: str, decisions: list[Decision]) -> None:
    """Shredding destroys keys: it cannot erase data a system holds in clear, so say so."""
    shredding = sorted({(d.rule, d.category or "-") for d in decisions if d.strategy == "shred"})
    if shredding:
        rules = ", ".join(f"{rule} (category {category})" for rule, category in shredding)
        raise PolicyConflict(
            f"policy rule {rules} asks to crypto-shred data that {where} holds in clear; shred "
            "applies only to a `keys` system: give this system's data a delete, soft_delete, "
            "pseudonymize or anonymize rule, or encrypt it under the subjects' keys and map it to "
            "a keys system"
        )


# Which triggers are never earlier than which: `created` comes first; `last_activity` and
# `closed` come after it, in no fixed order between them.
_NOT_EARLIER: dict[Trigger, frozenset[Trigger]] = {
    "created": frozenset({"created", "last_activity", "closed"}),
    "last_activity": frozenset({"last_activity"}),
    "closed": frozenset({"closed"}),
}


class RetentionDecision(BaseModel):
    """How long one category is kept in one region (and scope), and the rules that say so.

    `keep_at_least` is the longest obligation (all of them are in `obligations`, longest first:
    those counted from other triggers may end later, and `removal_due` counts them all);
    `keep_at_most` is the limit that decides, with its action and trigger. When both apply,
    the data is kept until every obligation has ended and then removed by the limit's action:
    `overridden` says so, naming both rules, whenever the limit could end first. A legal hold
    beats both but is checked when a step runs, not here.
    """

    model_config = ConfigDict(frozen=True)

    category: str
    region: str
    scope: dict[str, str] = {}
    obligations: list[RetentionRule] = []
    limits: list[RetentionRule] = []
    """Every limit that applies, the deciding one first."""
    keep_at_least: RetentionRule | None = None
    keep_at_most: RetentionRule | None = None
    overridden: list[str] = []
    """One sentence per obligation that holds the limit back, naming both rules."""
    assumed: dict[str, str] = {}
    """Rules scoped by a key the caller did not give, by id, with what was assumed: an
    obligation applies (the safe side: keep), a limit does not (nothing is removed on a
    guess)."""

    @property
    def rules(self) -> list[str]:
        """The ids of the rules that made the decision: obligations, then the deciding limit."""
        made = [rule.id for rule in self.obligations]
        return made + ([self.keep_at_most.id] if self.keep_at_most else [])

    @property
    def citations(self) -> dict[str, str]:
        """Each deciding rule's citation, by rule id."""
        deciding = [*self.obligations, *([self.keep_at_most] if self.keep_at_most else [])]
        return {rule.id: rule.citation for rule in deciding}

    @property
    def action(self) -> RetentionAction | None:
        """What the sweep does once the data may go (the limit's action); None: no limit."""
        return self.keep_at_most.removal if self.keep_at_most else None

    def removal_due(self, dates: Mapping[Trigger, datetime]) -> datetime | None:
        """When the limit's action is due for data with these trigger dates: once the limit's
        period and every obligation's have passed. None without a limit (nothing removes it);
        KeyError when a date a rule counts from is missing."""
        if self.keep_at_most is None:
            return None
        ends = [dates[rule.trigger] + rule.period for rule in self.obligations]
        return max([dates[self.keep_at_most.trigger] + self.keep_at_most.period, *ends])


def _in_scope(rule: RetentionRule, scope: Mapping[str, str], assumed: dict[str, str]) -> bool:
    """True if the rule's `where` admits the scope; a key the scope lacks is decided on the safe
    side (an obligation applies, a limit does not) and recorded in `assumed`."""
    unknown = sorted(key for key in rule.where if key not in scope)
    if any(scope[key] not in values for key, values in rule.where.items() if key in scope):
        return False
    if not unknown:
        return True
    keys = ", ".join(unknown)
    if rule.kind == "obligation":
        assumed[rule.id] = f"{rule.summary} applies only to some {keys}; none given: kept"
        return True
    assumed[rule.id] = f"{rule.summary} applies only to some {keys}; none given: not applied"
    return False


def _rank(rule: RetentionRule) -> tuple[int, int, int]:
    """How specific a rule is: its category's depth, then naming regions, then a `where`."""
    return (specificity(rule.category), bool(rule.regions), len(rule.where))


def _deciding_limit(limits: list[RetentionRule], data: str) -> list[RetentionRule]:
    """The limits, the deciding one first: the most specific; PolicyConflict when two equally
    specific limits disagree on period, trigger or action."""
    ordered = sorted(limits, key=lambda rule: (tuple(-n for n in _rank(rule)), rule.id))
    if not ordered:
        return ordered
    first = ordered[0]
    for other in ordered[1:]:
        if _rank(other) != _rank(first):
            break
        if (other.period, other.trigger, other.removal) != (
            first.period,
            first.trigger,
            first.removal,
        ):
            raise PolicyConflict(
                f"retention limits {first.id!r} and {other.id!r} both apply to {data} and are "
                f"as specific as each other, but one says {_limit_text(first)} and the "
                f"other {_limit_text(other)}: make one of them more specific (a deeper "
                "category, `regions` or `where`), or agree on one"
            )
    return ordered


def _limit_text(rule: RetentionRule) -> str:
    return f"{rule.removal} {rule.period_text} after {rule.trigger}"


def _holds_back(obligation: RetentionRule, limit: RetentionRule) -> bool:
    """True if the limit could end before the obligation (so the obligation overrides it)."""
    ends_later = limit.trigger in _NOT_EARLIER[obligation.trigger]
    return not (ends_later and limit.period >= obligation.period)


def retention_for(
    pack: PolicyPack, category: str, region: str, scope: Mapping[str, str] | None = None
) -> RetentionDecision:
    """How long data of `category` held in `region` (with these scope values, e.g.
    `{"tenant": "st-mary"}`) is kept: the obligations and the limit that apply, and why.

    A rule applies when its category is the data's or a parent of it, it names the region or
    none, and its `where` admits the scope. PolicyConflict, naming both rules, when two equally
    specific limits disagree (a deeper category, then naming regions, then a `where`, is more
    specific).
    """
    given = dict(scope or {})
    assumed: dict[str, str] = {}
    applying = [
        rule
        for rule in pack.retention
        if matches(rule.category, category)
        and (not rule.regions or region in rule.regions)
        and _in_scope(rule, given, assumed)
    ]
    obligations = sorted(
        (rule for rule in applying if rule.kind == "obligation"),
        key=lambda rule: (-rule.period, rule.id),
    )
    limits = _deciding_limit(
        [rule for rule in applying if rule.kind == "limit"], f"{category} in {region}"
    )
    limit = limits[0] if limits else None
    overridden = [
        f"limit {limit.summary} is overridden by obligation {obligation.summary}: the data is "
        f"kept until the obligation ends, then the limit's {limit.removal} applies"
        for obligation in obligations
        if limit is not None and _holds_back(obligation, limit)
    ]
    return RetentionDecision(
        category=category,
        region=region,
        scope=given,
        obligations=obligations,
        limits=limits,
        keep_at_least=obligations[0] if obligations else None,
        keep_at_most=limit,
        overridden=overridden,
        assumed=assumed,
    )


def decide(
    pack: PolicyPack, category: str, region: str, scope: Mapping[str, str] | None = None
) -> Decision:
    """What erasure does to one category of data held in `region`: `retain` while a retention
    obligation keeps it (exactly the obligations `retention_for` reports), else the most
    specific erasure rule, else the pack's default."""
    retention = retention_for(pack, category, region, scope)
    obligations = retention.obligations
    if obligations:
        longest, others = obligations[0], obligations[1:]
        also = "".join(f"; also {rule.summary}" for rule in others)
        also += "".join(
            f" ({retention.assumed[r.id]})" for r in obligations if r.id in retention.assumed
        )
        return Decision(
            rule=longest.id,
            category=category,
            strategy="retain",
            citation=longest.citation,
            exception=(
                f"retention obligation: keep at least {longest.period_text} from "
                f"{longest.trigger}{also}"
            ),
        )
    candidates = [rule for rule in pack.erasure.rules if matches(rule.category, category)]
    if candidates:
        rule = max(candidates, key=lambda r: specificity(r.category))
        return Decision(
            rule=rule.id,
            category=category,
            strategy=rule.strategy,
            citation=rule.citation,
            exception=rule.exception,
        )
    return Decision(
        rule=f"{pack.name}.default",
        category=category,
        strategy=pack.erasure.default.strategy,
        citation=pack.erasure.default.citation,
    )


def _strongest(decisions: list[Decision]) -> Decision:
    return max(decisions, key=lambda d: _KEEPS_MORE[d.strategy])


def _override(strategy: Strategy, decisions: list[Decision]) -> list[Decision]:
    """A data-map override replaces erasure decisions, never retention obligations."""
    return [
        d
        if d.exception and d.strategy == "retain"
        else Decision(
            rule="datamap.override",
            category=d.category,
            strategy=strategy,
            citation=f"data map override of {d.rule} ({d.citation})",
        )
        for d in decisions
    ]


def sql_action(
    system: str, locator: SqlTableLocator, decisions: dict[str, Decision]
) -> tuple[Action, list[str], list[Decision]]:
    """Action, kept columns and decisions for a table, from its columns' decisions.

    Kept columns keep the row, linked to the subject: it is soft-deleted where the table can be
    marked, else pseudonymised (the rest cleared, the link kept), never called anonymous.
    Otherwise the strategy that keeps the most decides: `anonymize`, which breaks the row's
    link to the subject, only when no column asks to keep more (retain, soft delete or
    pseudonymise).
    """
    by_column = dict(decisions)
    if locator.strategy is not None:
        replaced = _override(locator.strategy, list(by_column.values()))
        by_column = dict(zip(by_column, replaced, strict=True))
    _refuse_shred(f"{system}/{locator.table}", list(by_column.values()))
    kept = sorted(c for c, d in by_column.items() if d.strategy == "retain")
    rest = [d for c, d in by_column.items() if c not in kept]
    used = sorted(set(by_column.values()), key=lambda d: (d.rule, d.category or ""))
    if not rest:
        return "retain", kept, used
    strongest = _strongest(rest).strategy
    if kept or strongest == "soft_delete":
        # Keeping some columns means the row stays, linked to the subject: restrict it (soft
        # delete) where the table can mark it, otherwise clear the rest in place and keep the link.
        if locator.soft_delete_column is not None:
            return "soft_delete", kept, used
        if strongest == "soft_delete":
            raise PolicyConflict(
                f"policy asks to soft-delete rows of {system}/{locator.table}, but the data map "
                "gives it no soft_delete_column"
            )
        return "pseudonymize", kept, used
    if strongest == "pseudonymize":
        return "pseudonymize", kept, used
    if strongest == "anonymize":
        return "anonymize", kept, used
    return "delete", kept, used


def locator_action(
    kind: SystemKind,
    strategy_override: Strategy | None,
    decisions: list[Decision],
    where: str = "the locator",
    removal: TopicRemoval | None = None,
) -> tuple[Action, list[Decision]]:
    """Action and decisions for a non-SQL locator: any `retain` keeps it whole.

    A `keys` system is shredded whatever erasing strategy its categories get (destroying the
    keys erases every encrypted copy), and so is a topic whose `removal` is `crypto_shred`
    (encrypted under those keys); `shred` anywhere else is a PolicyConflict (`where`, e.g. the
    step id `events/0`, names the locator). A topic left to its retention is `expire`.
    """
    if strategy_override is not None:
        decisions = _override(strategy_override, decisions)
    unique = sorted(set(decisions), key=lambda d: (d.rule, d.category or ""))
    strongest = _strongest(decisions)
    if strongest.strategy == "retain":
        # For a keys system too: the keys stay while any data under them must be kept.
        return "retain", unique
    if kind == "keys" or removal == "crypto_shred":
        return "shred", unique
    _refuse_shred(where, decisions)
    if kind == "kafka":
        return ("expire" if removal == "retention" else "tombstone"), unique
    if kind == "redis":
        return "purge", unique
    if kind == "logs":
        keeps_records = strongest.strategy in ("anonymize", "pseudonymize", "soft_delete")
        return ("redact" if keeps_records else "delete"), unique
    return "delete", unique
