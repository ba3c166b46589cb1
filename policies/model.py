"""The policy pack: retention rules and erasure rules, each naming the law that makes it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from classification.datamap import CategoryKey, Strategy
from lethe.yamlfile import load_model

RuleId = str


class PackModel(BaseModel):
    """Base of policy-pack models: immutable, unknown keys are an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ErasureRule(PackModel):
    """What erasure does to one category (and its children)."""

    id: RuleId = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,80}$")
    category: CategoryKey
    strategy: Strategy
    citation: str = Field(min_length=3)
    exception: str | None = None
    """Required for `retain`: the Art. 17(3) exception (or other law) that allows keeping it."""

    @model_validator(mode="after")
    def _retain_needs_exception(self) -> ErasureRule:
        if self.strategy == "retain" and not self.exception:
            raise ValueError("a `retain` rule must name its exception (e.g. GDPR Art. 17(3)(b))")
        return self


class ErasureDefault(PackModel):
    """What erasure does to a category no rule names."""

    strategy: Strategy = "delete"
    citation: str = Field(min_length=3)


class Approval(PackModel):
    """When a DPO must approve an erasure before anything is destroyed."""

    always: bool = False
    special_category: bool = True
    """Ask for approval when the plan touches GDPR Art. 9 special-category data."""


class ErasurePolicy(PackModel):
    """Erasure rules, the default, approval, the deadline and the deferred window."""

    default: ErasureDefault
    rules: list[ErasureRule] = []
    approval: Approval = Approval()
    deadline_months: int = Field(default=1, ge=1, le=3)
    """GDPR Art. 12(3): answer within one month of receipt."""
    max_extension_months: int = Field(default=2, ge=0, le=2)
    """GDPR Art. 12(3): extendable by two further months, with reasons."""
    window_days: int = Field(default=30, ge=0, le=365)
    """Backups and logs are erased within this many days (the deferred phase)."""

    @field_validator("rules")
    @classmethod
    def _one_rule_per_category(cls, rules: list[ErasureRule]) -> list[ErasureRule]:
        seen: dict[str, str] = {}
        for rule in rules:
            if rule.category in seen:
                raise ValueError(
                    f"rules {seen[rule.category]!r} and {rule.id!r} both target "
                    f"{rule.category!r}: keep one"
                )
            seen[rule.category] = rule.id
        return rules


Trigger = Literal["created", "last_activity", "account_closed", "encounter_end"]


class RetentionRule(PackModel):
    """How long a category must (obligation) or may be kept in some regions, and what then."""

    id: RuleId = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,80}$")
    category: CategoryKey
    regions: list[str] = []
    """The regions (jurisdictions) where the rule applies; empty means everywhere."""
    period_days: int = Field(ge=1)
    trigger: Trigger = "created"
    action: Literal["delete", "anonymize"] = "delete"
    obligation: bool = False
    """True when the law requires keeping the data for the period: erasure must then retain it."""
    citation: str = Field(min_length=3)

    @property
    def period(self) -> timedelta:
        """The retention period."""
        return timedelta(days=self.period_days)


class PolicyPack(PackModel):
    """A named, versioned set of retention and erasure rules."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    version: str = Field(min_length=1)
    description: str = ""
    erasure: ErasurePolicy
    retention: list[RetentionRule] = []

    @property
    def label(self) -> str:
        """`name@version`, as plans and certificates cite it."""
        return f"{self.name}@{self.version}"


def load_pack(path: str | Path) -> PolicyPack:
    """Read and validate a policy pack; errors name the file, the line and the path inside it."""
    return load_model(path, PolicyPack)


PACKS_DIR = Path(__file__).parent / "packs"
