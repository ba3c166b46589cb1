"""The policy pack: retention rules and erasure rules, each naming the law that makes it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lethe.classification.datamap import CategoryKey, Strategy
from lethe.kernel.deadlines import format_duration, parse_duration
from lethe.kernel.yamlfile import load_model

RuleId = str
MAX_WINDOW = timedelta(days=365)
"""The longest erasure window a pack may give."""


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
    """Required for `retain` and `pseudonymize`: the Art. 17(3) exception (or other law) that
    allows keeping the data (pseudonymised data is still personal data, GDPR Art. 4(5))."""

    @model_validator(mode="after")
    def _keeping_needs_exception(self) -> ErasureRule:
        if self.strategy in ("retain", "pseudonymize") and not self.exception:
            kept = "keeps the data" if self.strategy == "retain" else "keeps personal data"
            raise ValueError(
                f"a `{self.strategy}` rule {kept} and must name its exception (e.g. GDPR "
                "Art. 17(3)(b) or (c))"
            )
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
    window: timedelta | None = None
    """Backups and logs are erased within this long (the deferred phase): `30d`, `12h`,
    `1d12h`. The window ends at the Art. 12(3) deadline at the latest, whatever its length,
    unless `window_may_end_after_deadline` says why it may not. Default 30 days."""
    window_days: int | None = Field(default=None, ge=0, le=365)
    """The window in whole days, as older packs give it: give `window` or this, not both."""
    window_may_end_after_deadline: str | None = Field(default=None, min_length=3)
    """Why the window may end after the deadline (the law or guidance that allows it). Unset,
    the safe default: the window ends at the deadline when that comes first."""

    @field_validator("window", mode="before")
    @classmethod
    def _window_is_a_duration(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_duration(value)
        if isinstance(value, int | float):
            raise ValueError(f"{value!r} has no unit: say `{value}d` (or `window_days: {value}`)")
        return value

    @model_validator(mode="after")
    def _one_window(self) -> ErasurePolicy:
        if self.window is not None and self.window_days is not None:
            raise ValueError("give the window once: `window` (e.g. 30d) or `window_days`, not both")
        length = self.window_length
        if not timedelta(0) <= length <= MAX_WINDOW:
            raise ValueError(
                f"window: {format_duration(length)} is outside 0s to {MAX_WINDOW.days}d"
            )
        return self

    @property
    def window_length(self) -> timedelta:
        """The window: `window`, else `window_days` days, else 30 days."""
        if self.window is not None:
            return self.window
        return timedelta(days=30 if self.window_days is None else self.window_days)

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
