"""The policy engine: what erasure may do to each category, and to each locator, and why.

Precedence: a legal hold (checked when a step runs) > a retention obligation > an erasure rule >
the pack's default. Among retention obligations the longest wins; among erasure rules the most
specific category wins. Every decision names the rule that made it.
"""

from __future__ import annotations

from lethe.classification.datamap import SqlTableLocator, Strategy, SystemKind, TopicRemoval
from lethe.classification.taxonomy import matches, specificity
from lethe.contracts import Action, Decision
from lethe.kernel.errors import LetheError
from lethe.policies.model import PolicyPack

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


def decide(pack: PolicyPack, category: str, region: str) -> Decision:
    """The decision for one category of data held in `region`."""
    obligations = [
        rule
        for rule in pack.retention
        if rule.obligation
        and matches(rule.category, category)
        and (not rule.regions or region in rule.regions)
    ]
    if obligations:
        longest = max(obligations, key=lambda rule: rule.period_days)
        return Decision(
            rule=longest.id,
            category=category,
            strategy="retain",
            citation=longest.citation,
            exception=f"retention obligation of {longest.period_days} days",
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
