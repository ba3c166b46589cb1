"""The data map: which systems hold personal data, in which region, and where inside them.

A YAML file, validated by pydantic. Connections are given by the *name* of an environment
variable, never the secret. Locators use templates such as `patient:{subject_id}` whose
placeholders are `{subject_id}`, `{tenant}`, `{subject_ref}` and `{identity.NAME}`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ClassVar, Literal, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lethe.classification.taxonomy import UnknownCategory, category
from lethe.kernel.errors import LetheError
from lethe.kernel.regions import validate_region
from lethe.kernel.yamlfile import load_model

SQL_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"
SQL_TABLE = r"^([A-Za-z_][A-Za-z0-9_]{0,62}\.)?[A-Za-z_][A-Za-z0-9_]{0,62}$"
ENV_NAME = r"^[A-Z_][A-Z0-9_]*$"
IDENTITY_NAME = r"[a-z][a-z0-9_]{0,30}"
"""An identity's name, as a subject's identities name them (`email`, `mrn`)."""
JSON_PATH = r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*$"
"""A field of a JSON value, dotted for nested objects: `member.id`."""
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_PLACEHOLDER_NAME = re.compile(r"^(subject_id|tenant|subject_ref|identity\.[a-z][a-z0-9_]*)$")

SqlName = Annotated[str, Field(pattern=SQL_NAME)]
SqlTable = Annotated[str, Field(pattern=SQL_TABLE)]
Region = Annotated[str, Field(min_length=1)]


class MapModel(BaseModel):
    """Base of data-map models: immutable, unknown keys are an error (typos do not pass)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def template_fields(template: str) -> list[str]:
    """The placeholders of a locator template, validated."""
    names = _PLACEHOLDER.findall(template)
    for name in names:
        if not _PLACEHOLDER_NAME.fullmatch(name):
            raise ValueError(
                f"placeholder {{{name}}} is unknown: use {{subject_id}}, {{tenant}}, "
                "{subject_ref} or {identity.NAME}"
            )
    return names


def _checked_template(template: str) -> str:
    if not template_fields(template):
        raise ValueError("template has no placeholder, so it would match every subject")
    return template


def _known_category(key: str) -> str:
    try:
        category(key)
    except UnknownCategory as exc:
        raise ValueError(str(exc)) from None
    return key


def _checked_container(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]", name) or "--" in name:
        raise ValueError(
            f"{name[:70]!r} is not a blob container name: 3-63 lower-case letters, digits and "
            "single dashes, starting and ending with a letter or digit"
        )
    return name


ContainerName = Annotated[str, AfterValidator(_checked_container)]
CategoryKey = Annotated[str, AfterValidator(_known_category)]
"""A key of the taxonomy, e.g. `user.contact.email`."""
Strategy = Literal[
    "delete", "soft_delete", "pseudonymize", "anonymize", "tombstone", "purge", "retain", "shred"
]
"""`anonymize` breaks every link to the subject (Recital 26: no longer personal data);
`pseudonymize` clears the personal columns and keeps the links (Art. 4(5): still personal data)."""


class SystemBase(MapModel):
    """What every system has: a name, a region, the variable naming its connection, and the
    tenants whose subjects it holds."""

    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,62}$")
    region: Region
    connection: str = Field(pattern=ENV_NAME)
    """The name of the environment variable that holds the connection, never the secret."""
    tenants: list[str] | None = None
    """The tenants whose subjects' data the system holds; when omitted, the tenants whose home
    region is the system's. Only those tenants' erasures plan a step here."""


DateTrigger = Literal["created", "last_activity", "closed"]
"""The events a retention period can run from: a record's creation, the subject's last activity,
or the closing of what the record belongs to (an account, an encounter)."""
TRIGGERS: tuple[DateTrigger, ...] = ("created", "last_activity", "closed")


def _date_column(name: str) -> str:
    if "." in name:
        raise ValueError(
            f"{name[:70]!r} names another table: a date or scope column is a column of the "
            "table itself (a column of a `via` table cannot date its rows)"
        )
    if not re.fullmatch(SQL_NAME, name):
        raise ValueError(
            f"{name[:70]!r} is not a SQL column name: letters, digits and _, starting with a "
            "letter or _, at most 63 characters"
        )
    return name


def _json_field(path: str) -> str:
    if not re.fullmatch(JSON_PATH, path):
        raise ValueError(
            f"{path[:70]!r} is not a field of a JSON record: names of letters, digits, _ and -, "
            "dotted for nested objects (e.g. meta.ts)"
        )
    return path


def _scope_key(key: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,62}", key):
        raise ValueError(
            f"{key[:70]!r} is not a scope key: lower-case letters, digits and _, starting with a "
            "letter, as a retention rule's where: names it (e.g. tenant)"
        )
    return key


ScopeKey = Annotated[str, AfterValidator(_scope_key)]
"""What a retention rule may be narrowed to (`tenant`, `ward`, ...), as its `where:` names it."""
SqlDateColumn = Annotated[str, AfterValidator(_date_column)]
LogField = Annotated[str, AfterValidator(_json_field)]


class RetentionDates(MapModel):
    """Which field of a locator's records dates them for each retention trigger.

    A retention rule counts its period from `created`, `last_activity` or `closed`; a locator
    names the field holding that date for the triggers its records have (at least one). A record
    whose date is null is reported and kept, unless `nulls: delete`. `scopes` names the field
    holding each key a rule may be narrowed to (`{tenant: tenant_id}` for a rule saying
    `where: {tenant: [st-mary]}`). Each kind of locator has its own subclass, which says what a
    field is there.
    """

    created: str | None = None
    last_activity: str | None = None
    closed: str | None = None
    nulls: Literal["report", "delete"] = "report"
    """What a sweep does with a record whose date is null: report it and keep it, or delete it."""
    scopes: dict[ScopeKey, str] = {}
    """Scope key -> the field holding it."""

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: object) -> object:
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    raise ValueError(
                        f"{str(key)[:40]!r} is not a trigger: give the date field for created, "
                        "last_activity or closed (and optionally nulls, scopes)"
                    )
        return data

    @model_validator(mode="after")
    def _a_trigger(self) -> RetentionDates:
        if not self.triggers:
            raise ValueError(
                "give the field that dates the records for at least one trigger: created, "
                "last_activity or closed"
            )
        return self

    @property
    def triggers(self) -> dict[DateTrigger, str]:
        """Each trigger the locator's records have -> the field dating them for it."""
        given: dict[DateTrigger, str | None] = {
            "created": self.created,
            "last_activity": self.last_activity,
            "closed": self.closed,
        }
        return {trigger: name for trigger, name in given.items() if name is not None}


class SqlRetentionDates(RetentionDates):
    """A table's dates: columns of the table itself (DATE, TIMESTAMP, DATETIME; `lethe datamap
    check --live` checks that they are), and scope columns beside them (`{tenant: tenant_id}`)."""

    created: SqlDateColumn | None = None
    last_activity: SqlDateColumn | None = None
    closed: SqlDateColumn | None = None
    scopes: dict[ScopeKey, SqlDateColumn] = {}


class LogRetentionDates(RetentionDates):
    """A log record's dates: fields of the JSON record, dotted for nested ones (`meta.ts`)."""

    created: LogField | None = None
    last_activity: LogField | None = None
    closed: LogField | None = None
    scopes: dict[ScopeKey, LogField] = {}


class _OwnDates(RetentionDates):
    """Dates a system keeps for every record itself: only `created`, one of `_dates`; never null,
    never scoped inside the locator."""

    _record: ClassVar[str] = "a record"
    _how: ClassVar[str] = ""
    _dates: ClassVar[tuple[str, ...]] = ()
    _no_scope: ClassVar[str] = ""

    @field_validator("created")
    @classmethod
    def _own_date(cls, value: str | None) -> str | None:
        if value is not None and value not in cls._dates:
            raise ValueError(
                f"{value[:70]!r} cannot date {cls._record}: it is dated {cls._how}, so give "
                f"created: {' or '.join(cls._dates)}"
            )
        return value

    @field_validator("last_activity", "closed")
    @classmethod
    def _created_only(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            raise ValueError(
                f"{cls._record} has no {info.field_name} date: it is dated only by created "
                f"({' or '.join(cls._dates)})"
            )
        return value

    @field_validator("nulls")
    @classmethod
    def _never_null(cls, value: str) -> str:
        if value != "report":
            raise ValueError(f"{cls._record} always has its date, so nulls does not apply")
        return value

    @field_validator("scopes")
    @classmethod
    def _unscoped(cls, value: dict[str, str]) -> dict[str, str]:
        if value:
            raise ValueError(cls._no_scope)
        return value


class BlobRetentionDates(_OwnDates):
    """A backup blob is dated only by `created`: its `creation_time` or its `last_modified`
    property (the storage service's, never the blob's content). A container is one scope."""

    _record = "a backup blob"
    _how = "by the storage service's own property"
    _dates = ("creation_time", "last_modified")
    _no_scope = (
        "a backup blob has no fields to scope a rule by: give each scope a container (a locator) "
        "of its own"
    )


class KafkaRetentionDates(_OwnDates):
    """A topic's records are dated by their own timestamp (`created: timestamp`): Kafka removes
    them by age for the whole topic (`retention.ms`), so no other trigger and no scope apply."""

    _record = "a Kafka record"
    _how = "by its own timestamp, from which Kafka's retention runs"
    _dates = ("timestamp",)
    _no_scope = (
        "Kafka removes a topic's records by age for the whole topic (retention.ms), so a rule "
        "cannot be scoped inside it"
    )


class SqlJoin(MapModel):
    """One hop of a join path: `column` of this table references `references` of `table`."""

    column: SqlName
    table: SqlTable
    references: SqlName


class SqlTableLocator(MapModel):
    """A table holding personal data, found by the subject column (directly or through joins)."""

    table: SqlTable
    subject_column: SqlName
    """The column holding the subject id: on this table, or on the last table of `via`."""
    via: list[SqlJoin] = []
    tenant_column: SqlName | None = None
    """The column holding the subject's tenant, beside the subject column: required where the
    system holds several tenants, so one tenant's erasure never touches another's rows."""
    soft_delete_column: SqlName | None = None
    columns: dict[SqlName, CategoryKey] = Field(min_length=1)
    """Personal columns and the category of each."""
    strategy: Strategy | None = None
    """Overrides what the policy decides for this table."""
    unlink: Literal["null", "surrogate"] | None = None
    """How `anonymize` breaks each row's link to the subject: the subject column, or for a
    table found through `via` the join column of the first hop. `null`, or `surrogate` (a
    random value of the column's type, a different one for each row, that no row it could
    reference holds). Unset: NULL where the column is nullable, else a surrogate where no
    foreign key constrains it; where neither is possible the step fails its preflight."""
    retention: SqlRetentionDates | None = None
    """The columns of this table (never of a `via` table) dating its rows for retention."""
    identities: dict[str, str] = {}
    """Identity name (lower-case, as a request's identities name them: `email`, `mrn`) -> the
    column of this table (never of a `via` table) holding it. Tenant offboarding reads them with
    each subject it finds here, so that locators needing `{identity.NAME}` can be erased."""

    @field_validator("identities")
    @classmethod
    def _identity_columns(cls, identities: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        table = info.data.get("table", "?")
        for name, column in identities.items():
            if not re.fullmatch(IDENTITY_NAME, name):
                raise ValueError(
                    f"table {table!r}: identity {name[:40]!r} is not an identity name: lower-case "
                    "letters, digits and _, starting with a letter, at most 31 characters (email)"
                )
            if not re.fullmatch(SQL_NAME, column):
                raise ValueError(
                    f"table {table!r}: identity {name!r} names {column[:70]!r}, which is not "
                    "a SQL column name of the table: letters, digits and _, starting with a letter "
                    "or _, at most 63 characters"
                )
        return identities

    @field_validator("strategy")
    @classmethod
    def _no_shred(cls, strategy: Strategy | None) -> Strategy | None:
        if strategy == "shred":
            raise ValueError(
                "strategy shred destroys a subject's data keys and applies only to a `keys` "
                "system; a table's columns are erased with delete, soft_delete, pseudonymize or "
                "anonymize"
            )
        return strategy

    @property
    def categories(self) -> list[str]:
        """The categories of the table's personal columns."""
        return sorted(set(self.columns.values()))


class SqlSystem(SystemBase):
    """A relational database (PostgreSQL or SQLite through SQLAlchemy)."""

    kind: Literal["sql"]
    tables: list[SqlTableLocator] = Field(min_length=1)


TopicRemoval = Literal["retention", "crypto_shred"]


class KafkaTopicLocator(MapModel):
    """A topic with the subject's records, found in exactly one of these ways.

    - `key_template`: records keyed by the subject; erasure tombstones the rendered key.
    - `value_field` (with `value_template`, `{subject_id}` by default): records keyed by
      something else (a claim id) with the subject in a field of the JSON value; erasure reads
      the topic and tombstones each key whose latest record is the subject's. The topic must be
      compacted, or a tombstone removes nothing.
    - `removal: retention`: a topic that cannot be edited per subject; nothing is written, and
      the plan and the certificate give the date by which retention has removed every record
      older than the erasure (or say that it never does).
    - `removal: crypto_shred` with `shredded_by` (a keys system): the records are encrypted
      under the subjects' keys (`lethe.keys.service`); that system's shred step erases them.
    """

    topic: str = Field(pattern=r"^[A-Za-z0-9._-]{1,249}$")
    key_template: str | None = None
    value_field: str | None = Field(default=None, pattern=JSON_PATH)
    value_template: str = "{subject_id}"
    tenant_field: str | None = Field(default=None, pattern=JSON_PATH)
    """With `value_field`: the field holding the tenant, for a topic of several tenants."""
    removal: TopicRemoval | None = None
    shredded_by: str | None = None
    categories: list[CategoryKey] = Field(min_length=1)
    retention: KafkaRetentionDates | None = None
    """`created: timestamp`: the records are dated by their own timestamp."""

    _template = field_validator("key_template")(
        lambda value: None if value is None else _checked_template(value)
    )
    _value_template = field_validator("value_template")(_checked_template)

    @model_validator(mode="after")
    def _one_way(self) -> KafkaTopicLocator:
        ways = [self.key_template, self.value_field, self.removal]
        if sum(way is not None for way in ways) != 1:
            raise ValueError(
                "give one of key_template, value_field or removal (how the subject's records "
                "are found, or why they cannot be)"
            )
        if self.removal == "crypto_shred" and self.shredded_by is None:
            raise ValueError("removal: crypto_shred needs shredded_by, the keys system")
        if self.removal != "crypto_shred" and self.shredded_by is not None:
            raise ValueError("shredded_by only goes with removal: crypto_shred")
        if self.value_field is None and self.tenant_field is not None:
            raise ValueError("tenant_field only goes with value_field")
        return self


class KafkaSystem(SystemBase):
    """An Apache Kafka cluster; `connection` names the variable holding bootstrap servers."""

    kind: Literal["kafka"]
    topics: list[KafkaTopicLocator] = Field(min_length=1)


class RedisHashField(MapModel):
    """A field of a shared hash that belongs to the subject."""

    key: str
    field: str

    _field = field_validator("field")(_checked_template)


class RedisLocator(MapModel):
    """Keys (glob patterns after rendering) and hash fields holding the subject's data.

    No retention dates: a cache's keys expire by their TTL, which a sweep reconciles with the
    policy rather than dating each key.
    """

    patterns: list[str] = []
    hash_fields: list[RedisHashField] = []
    categories: list[CategoryKey] = Field(min_length=1)

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, patterns: list[str]) -> list[str]:
        return [_checked_template(p) for p in patterns]

    @model_validator(mode="after")
    def _something_to_purge(self) -> RedisLocator:
        if not self.patterns and not self.hash_fields:
            raise ValueError("give patterns, hash_fields or both")
        return self


class RedisSystem(SystemBase):
    """A Redis cache."""

    kind: Literal["redis"]
    keys: list[RedisLocator] = Field(min_length=1)


class BlobBackupLocator(MapModel):
    """Backups in a blob container.

    Per-subject blobs are found by an index tag holding the subject reference, or by a prefix
    template; whole-database backups by a prefix, dated by their creation time.
    """

    container: ContainerName
    subject_tag: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:/=+-]{1,128}$")
    subject_prefix: str | None = None
    whole_backup_prefix: str | None = None
    backup_of: str | None = None
    """The system whose whole backups lie under `whole_backup_prefix`: an erasure handles them
    only when that system is in its plan."""
    categories: list[CategoryKey] = Field(min_length=1)
    retention: BlobRetentionDates | None = None
    """`created: creation_time` (or `last_modified`): the blob's own property dates it."""

    _prefix = field_validator("subject_prefix")(
        lambda v: _checked_template(v) if v is not None else v
    )

    @model_validator(mode="after")
    def _something_to_find(self) -> BlobBackupLocator:
        if not (self.subject_tag or self.subject_prefix or self.whole_backup_prefix):
            raise ValueError("give subject_tag, subject_prefix or whole_backup_prefix")
        return self


class BlobSystem(SystemBase):
    """An Azure Blob Storage account holding backups."""

    kind: Literal["blob"]
    backups: list[BlobBackupLocator] = Field(min_length=1)


class LogLocator(MapModel):
    """JSON-lines log blobs; a record is the subject's if one of `fields` holds their value."""

    container: ContainerName
    prefix: str = ""
    fields: dict[str, str] = Field(min_length=1)
    """Log field -> the subject value it carries: `subject_id` or `identity.NAME`."""
    tenant_field: str | None = None
    """The log field holding the tenant: a record is the subject's only if it names their
    tenant. Required where the system holds several tenants."""
    categories: list[CategoryKey] = Field(min_length=1)
    retention: LogRetentionDates | None = None
    """The fields of a JSON record dating it for retention (e.g. `created: ts`)."""

    @field_validator("fields")
    @classmethod
    def _field_sources(cls, fields: dict[str, str]) -> dict[str, str]:
        for source in fields.values():
            if not re.fullmatch(r"subject_id|identity\.[a-z][a-z0-9_]*", source):
                raise ValueError(f"{source!r} must be subject_id or identity.NAME")
        return fields


class LogsSystem(SystemBase):
    """Application logs kept as JSON-lines blobs in Azure Blob Storage."""

    kind: Literal["logs"]
    logs: list[LogLocator] = Field(min_length=1)


class KeysLocator(MapModel):
    """The data services encrypt under subjects' data keys (`lethe.keys.service`), by category."""

    categories: list[CategoryKey] = Field(min_length=1)


class KeysSystem(SystemBase):
    """Lethe's key service: shredding a subject's data keys erases every copy of what services
    encrypted under them (Kafka events, backups, documents); `connection` names the variable
    holding the key store's URL (e.g. LETHE_KEYS_STORE_URL)."""

    kind: Literal["keys"]
    categories: list[CategoryKey] = Field(min_length=1)
    """The categories of the personal data encrypted under subjects' keys."""

    @property
    def locator(self) -> KeysLocator:
        """The system's one locator: everything encrypted under the subject's keys."""
        return KeysLocator(categories=self.categories)


System = Annotated[
    SqlSystem | KafkaSystem | RedisSystem | BlobSystem | LogsSystem | KeysSystem,
    Field(discriminator="kind"),
]
SystemKind = Literal["sql", "kafka", "redis", "blob", "logs", "keys"]
DEFERRED_KINDS: frozenset[SystemKind] = frozenset({"blob", "logs"})
"""Kinds whose steps wait for the end of the erasure window (backups and logs: GDPR lets them
go within it); every other kind's steps run at once."""


class Tenant(MapModel):
    """A tenant (an organisation) and the region its subjects' data belongs to."""

    region: Region


class DataMap(MapModel):
    """The inventory of systems and where personal data lives in them."""

    version: Literal[1] = 1
    regions: list[str] = Field(min_length=1)
    tenants: dict[str, Tenant] = Field(min_length=1)
    systems: list[System] = Field(min_length=1)

    @field_validator("regions")
    @classmethod
    def _valid_regions(cls, regions: list[str]) -> list[str]:
        for region in regions:
            validate_region(region)
        if len(set(regions)) != len(regions):
            raise ValueError("a region is listed twice")
        return regions

    @model_validator(mode="after")
    def _references_resolve(self) -> DataMap:
        names = [s.name for s in self.systems]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"system names must be unique; repeated: {', '.join(duplicates)}")
        for system in self.systems:
            if system.region not in self.regions:
                raise ValueError(
                    f"system {system.name!r} is in region {system.region!r}, "
                    f"which is not one of the regions {self.regions}"
                )
        for name, tenant in self.tenants.items():
            if tenant.region not in self.regions:
                raise ValueError(
                    f"tenant {name!r} is in region {tenant.region!r}, "
                    f"which is not one of the regions {self.regions}"
                )
        for system in self.systems:
            unknown = sorted(set(system.tenants or []) - set(self.tenants))
            if unknown:
                raise ValueError(
                    f"system {system.name!r} lists tenant(s) {', '.join(unknown)}, which are not "
                    "among the data map's tenants"
                )
            _check_tenant_scoped(system, self.holders(system))
            if isinstance(system, BlobSystem):
                for index, backup in enumerate(system.backups):
                    self._check_backup_of(system.name, index, backup)
            if isinstance(system, KafkaSystem):
                for index, topic in enumerate(system.topics):
                    self._check_shredded_by(system.name, index, topic)
        return self

    def _check_shredded_by(self, system: str, index: int, topic: KafkaTopicLocator) -> None:
        if topic.shredded_by is None:
            return
        if topic.shredded_by not in {s.name for s in self.systems if s.kind == "keys"}:
            raise ValueError(
                f"system {system!r} topics[{index}]: shredded_by names {topic.shredded_by!r}, "
                "which is not a keys system of the data map"
            )

    def _check_backup_of(self, system: str, index: int, backup: BlobBackupLocator) -> None:
        if backup.whole_backup_prefix is None:
            if backup.backup_of is not None:
                raise ValueError(
                    f"system {system!r} backups[{index}]: backup_of applies only to whole backups "
                    "(whole_backup_prefix)"
                )
            return
        if backup.backup_of is None:
            raise ValueError(
                f"system {system!r} backups[{index}]: whole backups need backup_of, the system "
                "they are backups of, so that only erasures of that system's subjects handle them"
            )
        if backup.backup_of not in {s.name for s in self.systems}:
            raise ValueError(
                f"system {system!r} backups[{index}]: backup_of {backup.backup_of!r} is not a "
                "system of the data map"
            )

    def locators(self) -> list[PlacedLocator]:
        """Every locator of the map, in map order, with the path to it inside the map."""
        placed: list[PlacedLocator] = []
        for index, system in enumerate(self.systems):
            if isinstance(system, KeysSystem):
                placed.append(PlacedLocator(("systems", index), system, system.locator))
                continue
            field, locators = _LOCATORS[system.kind], getattr(system, _LOCATORS[system.kind])
            placed.extend(
                PlacedLocator(("systems", index, field, n), system, locator)
                for n, locator in enumerate(locators)
            )
        return placed

    def system(self, name: str) -> System:
        """The system called `name`."""
        for system in self.systems:
            if system.name == name:
                return system
        raise KeyError(name)

    def holders(self, system: SystemBase) -> list[str]:
        """The tenants whose subjects' data `system` holds."""
        if system.tenants is not None:
            return list(system.tenants)
        return sorted(name for name, t in self.tenants.items() if t.region == system.region)

    def systems_of(self, tenant: str) -> list[System]:
        """The systems that may hold data of `tenant`'s subjects, in map order."""
        return [system for system in self.systems if tenant in self.holders(system)]


_LOCATORS: dict[SystemKind, str] = {
    "sql": "tables",
    "kafka": "topics",
    "redis": "keys",
    "blob": "backups",
    "logs": "logs",
}
"""The field holding each kind's locators (a keys system is its own one locator)."""
Locator = (
    SqlTableLocator
    | KafkaTopicLocator
    | RedisLocator
    | BlobBackupLocator
    | LogLocator
    | KeysLocator
)


class PlacedLocator(NamedTuple):
    """A locator, its system, and the path to it inside the map (`systems[0].tables[2]`)."""

    path: tuple[str | int, ...]
    system: SqlSystem | KafkaSystem | RedisSystem | BlobSystem | LogsSystem | KeysSystem
    locator: Locator

    @property
    def retention(self) -> RetentionDates | None:
        """The fields dating the locator's records, where it gives them."""
        found: RetentionDates | None = getattr(self.locator, "retention", None)
        return found


_TENANT_SCOPED = ("{tenant}", "{subject_ref}")
"""Placeholders that make a template name one tenant's subject (the reference covers the tenant)."""


def _check_tenant_scoped(system: System, holders: list[str]) -> None:
    """A system holding several tenants must find the subject within their tenant, or an
    erasure in one tenant would hit another tenant's subject with the same id."""
    if len(holders) < 2:
        return

    def refuse(where: str, fix: str) -> None:
        raise ValueError(
            f"system {system.name!r} holds tenants {', '.join(holders)}, but {where} does not "
            f"tell them apart: {fix}"
        )

    def scoped(template: str) -> bool:
        return any(name in template for name in _TENANT_SCOPED)

    template_fix = "put {tenant} or {subject_ref} in it"
    if isinstance(system, SqlSystem):
        for table in system.tables:
            if table.tenant_column is None:
                refuse(f"table {table.table!r}", "give it a tenant_column")
    elif isinstance(system, KafkaSystem):
        for topic in system.topics:
            if topic.key_template is not None and not scoped(topic.key_template):
                refuse(f"the key template of topic {topic.topic!r}", template_fix)
            if topic.value_field is not None and not (
                topic.tenant_field is not None or scoped(topic.value_template)
            ):
                refuse(
                    f"the value field of topic {topic.topic!r}",
                    "give it a tenant_field, or put {tenant} or {subject_ref} in value_template",
                )
    elif isinstance(system, RedisSystem):
        for index, locator in enumerate(system.keys):
            for pattern in locator.patterns:
                if not scoped(pattern):
                    refuse(f"a pattern of keys[{index}]", template_fix)
            for entry in locator.hash_fields:
                if not (scoped(entry.key) or scoped(entry.field)):
                    refuse(f"a hash field of keys[{index}]", template_fix + " (key or field)")
    elif isinstance(system, BlobSystem):
        for index, backup in enumerate(system.backups):
            if backup.subject_prefix is not None and not scoped(backup.subject_prefix):
                refuse(f"the subject_prefix of backups[{index}]", template_fix)
    elif isinstance(system, LogsSystem):
        for log in system.logs:
            if log.tenant_field is None:
                refuse(f"the logs in container {log.container!r}", "give them a tenant_field")


def load_datamap(path: str | Path) -> DataMap:
    """Read and validate a data map; errors name the file, the line and the path inside it."""
    return load_model(path, DataMap)


def render(template: str, values: dict[str, str], escape: Callable[[str], str] = str) -> str:
    """Fill a locator template's placeholders; `escape` guards values (e.g. glob characters).

    `values` holds `subject_id`, `tenant`, `subject_ref` and `identity.NAME` entries. A
    placeholder without a value raises MissingIdentity, naming the placeholder only.
    """

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise MissingIdentity(f"the template needs {{{name}}}, which the request does not give")
        return escape(values[name])

    return _PLACEHOLDER.sub(fill, template)


class MissingIdentity(LetheError):
    """A locator needs an identity (e.g. an email) that the erasure request does not carry."""
