"""The policy pack: retention rules and erasure rules, each naming the law that makes it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from lethe.classification.datamap import CategoryKey, DateTrigger, ScopeKey, Strategy
from lethe.contracts import RetentionAction
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


Trigger = DateTrigger
"""What a retention period counts from: the record's creation, the subject's last activity, or
the closing of what the record belongs to (an account, an encounter, a matter). The data map
names the field dating each trigger (the same three). `created` comes first; the other two
come after it."""
RetentionKind = Literal["obligation", "limit"]
ScopeValue = Annotated[str, Field(min_length=1, max_length=200)]

_SCOPE_KEY: TypeAdapter[str] = TypeAdapter(ScopeKey)

# Old spellings a pack may still carry, and what to write instead.
_OLD_TRIGGERS = {"account_closed": "closed", "encounter_end": "closed"}


class RetentionRule(PackModel):
    """How long a category is kept in some regions (and scopes), and why.

    An `obligation` is a law that says keep at least `period`: nothing (no erasure, no sweep)
    removes the data before it ends. A `limit` says keep at most `period`: the sweep then applies
    `action`. Both count from `trigger`. A year is 365 days (`6y` = 2190 days): a law counted in
    calendar years may need the leap days added (`6y2d`).
    """

    id: RuleId = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,80}$")
    category: CategoryKey
    kind: RetentionKind
    """`obligation` (keep at least `period`) or `limit` (keep at most `period`)."""
    period: timedelta
    """How long: `6y`, `395d`, `12w` (a year is 365 days); `period_days: N` is read as `Nd`."""
    trigger: Trigger = "created"
    action: RetentionAction | None = None
    """A limit's action once its period has passed (default `delete`); an obligation removes
    nothing, so it has none."""
    regions: list[str] = []
    """The regions (jurisdictions) where the rule applies; empty means everywhere."""
    where: dict[ScopeKey, list[ScopeValue]] = {}
    """Only data whose scope key has one of these values, e.g. `{tenant: [st-mary]}`; the data
    map says which column holds each key. Empty: all data of the category."""
    citation: str = Field(min_length=3)

    @model_validator(mode="before")
    @classmethod
    def _plain_spelling(cls, data: object) -> object:
        """Old spellings are refused or mapped, each with the rule's id and what to write."""
        if not isinstance(data, dict):
            return data
        rule = data.get("id", "?")
        if "obligation" in data:
            old = data["obligation"]
            written = str(old).lower() if isinstance(old, bool) else repr(old)
            kind = "obligation" if old is True else "limit" if old is False else None
            say = f"write `kind: {kind}`" if kind else "write `kind: obligation` or `kind: limit`"
            raise ValueError(
                f"retention rule {rule!r}: `obligation: {written}` is no longer read: {say} "
                "(obligation: keep at least the period; limit: keep at most the period)"
            )
        if "kind" not in data:
            raise ValueError(
                f"retention rule {rule!r} says neither `kind: obligation` (keep at least the "
                "period) nor `kind: limit` (keep at most the period): say which"
            )
        trigger = data.get("trigger")
        if isinstance(trigger, str) and trigger in _OLD_TRIGGERS:
            raise ValueError(
                f"retention rule {rule!r}: trigger `{trigger}` is now "
                f"`{_OLD_TRIGGERS[trigger]}` (the data map names its date column)"
            )
        for field, allowed in (
            ("kind", RetentionKind),
            ("trigger", Trigger),
            ("action", RetentionAction),
        ):
            value = data.get(field)
            if value is not None and value not in get_args(allowed):
                raise ValueError(
                    f"retention rule {rule!r}: {field} {value!r} is not one of "
                    f"{', '.join(get_args(allowed))}"
                )
        where = data.get("where")
        if isinstance(where, dict):
            for key in where:
                try:
                    _SCOPE_KEY.validate_python(key)
                except ValidationError as exc:
                    message = exc.errors()[0]["msg"].removeprefix("Value error, ")
                    raise ValueError(f"retention rule {rule!r}: where: {message}") from None
        if "period_days" in data:
            if "period" in data:
                raise ValueError(
                    f"retention rule {rule!r}: give the period once, `period` (e.g. 6y or "
                    "395d) or `period_days`, not both"
                )
            days = data["period_days"]
            if not isinstance(days, int) or isinstance(days, bool):
                raise ValueError(
                    f"retention rule {rule!r}: period_days must be a whole number of days, "
                    f"not {days!r}"
                )
            data = {k: v for k, v in data.items() if k != "period_days"}
            data["period"] = timedelta(days=days)
        period = data.get("period")
        if isinstance(period, str) and period.strip().startswith("-"):
            raise ValueError(
                f"retention rule {rule!r}: period {period.strip()} is below zero: give a length "
                "above zero (e.g. 6y or 395d)"
            )
        if isinstance(period, str):
            try:
                parsed = parse_duration(period, years=True)
            except ValueError as exc:
                raise ValueError(f"retention rule {rule!r}: period: {exc}") from None
            data = {**data, "period": parsed}
        elif isinstance(period, int | float) and not isinstance(period, bool):
            raise ValueError(
                f"retention rule {rule!r}: period {period!r} has no unit: say `{period}d` "
                f"or `{period}y`"
            )
        return data

    @model_validator(mode="after")
    def _sound(self) -> RetentionRule:
        if self.period <= timedelta(0):
            raise ValueError(
                f"retention rule {self.id!r}: period {format_duration(self.period, years=True)} "
                "is not a length of time: give one above zero (e.g. 6y or 395d)"
            )
        if self.kind == "obligation" and self.action is not None:
            raise ValueError(
                f"retention rule {self.id!r} is an obligation (keep at least): it removes "
                f"nothing, so it takes no `action`; add a `kind: limit` rule to {self.action} "
                "the data after a time"
            )
        if len(set(self.regions)) != len(self.regions) or not all(self.regions):
            raise ValueError(f"retention rule {self.id!r}: regions must be distinct names")
        for key, values in self.where.items():
            if not values:
                raise ValueError(
                    f"retention rule {self.id!r}: where.{key} lists no value: name at least "
                    f"one, or drop `{key}`"
                )
            if len(set(values)) != len(values):
                raise ValueError(f"retention rule {self.id!r}: where.{key} repeats a value")
        return self

    @property
    def removal(self) -> RetentionAction | None:
        """What a limit does once its period has passed (`delete` unless it says); None for an
        obligation."""
        if self.kind == "obligation":
            return None
        return self.action or "delete"

    @property
    def period_text(self) -> str:
        """The period as a pack writes it (`6y`, `395d`)."""
        return format_duration(self.period, years=True)

    @property
    def summary(self) -> str:
        """`<id> (keep at least|at most <period> from <trigger>)`, as decisions name a rule."""
        kept = "keep at least" if self.kind == "obligation" else "keep at most"
        return f"{self.id} ({kept} {self.period_text} from {self.trigger})"


class PolicyPack(PackModel):
    """A named, versioned set of retention and erasure rules."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    version: str = Field(min_length=1)
    description: str = ""
    erasure: ErasurePolicy
    retention: list[RetentionRule] = []

    @field_validator("retention")
    @classmethod
    def _one_rule_per_id(cls, rules: list[RetentionRule]) -> list[RetentionRule]:
        ids = [rule.id for rule in rules]
        repeated = sorted({rule for rule in ids if ids.count(rule) > 1})
        if repeated:
            raise ValueError(
                f"retention rule id(s) {', '.join(repeated)} used twice: decisions name rules by "
                "id, so give each its own"
            )
        return rules

    @property
    def label(self) -> str:
        """`name@version`, as plans and certificates cite it."""
        return f"{self.name}@{self.version}"


def load_pack(path: str | Path) -> PolicyPack:
    """Read and validate a policy pack; errors name the file, the line and the path inside it."""
    return load_model(path, PolicyPack)


PACKS_DIR = Path(__file__).parent / "packs"
