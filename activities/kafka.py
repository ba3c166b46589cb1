"""The Kafka connector: tombstones the subject's key and works out when earlier records are gone.

A tombstone (a record with the subject's key and no value) tells consumers to drop the key at
once, but the subject's earlier records stay in the log until the log cleaner compacts them or
retention deletes their segment. When that is guaranteed depends on the topic's settings, so
erase records where the tombstone went and `removal_deadline` computes the bound from the
settings; verify reads the tombstone back and compares the bound with the erasure window.

Each step writes its tombstone once. The tombstone carries headers naming the request and the
step (`lethe-request`, `lethe-step`; no personal data), and erase first looks for one in the
key's partition, from the offset of the erasure's start (found by timestamp) or, narrower, from
where an earlier attempt's heartbeat says it was about to produce. A retry after a crash between
the delivery and the activity's completion finds the first tombstone and reports it as its
evidence (`tombstone_reused`) instead of writing a second one.

A topic keyed by something else, with the subject in a field of its JSON values
(`value_field`), is read whole (`lethe.activities.kafka_scan`); each key whose latest record is the
subject's gets a tombstone on that key's partition, with the same headers. A retry's scan sees
the first attempt's tombstones as those keys' latest records and reuses them. Verify reads the
topic again: no key's latest record may still be the subject's. A topic that cannot be edited per
subject (`removal: retention`) gets nothing written: its steps (`expire`) give the date by which
the topic's retention has removed every record older than the erasure.

Preflight checks, touching nothing, that the cluster answers, the topic exists, the key or value
template fills from the request, that a topic edited by value is compacted, and (where the
broker reports it) that this worker may write the topic.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, Self, TypeVar

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    KafkaError,
    KafkaException,
    Message,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AclOperation,
    ConfigResource,
    OffsetSpec,
    ResourceType,
)
from temporalio import activity

from lethe.activities.attempts import heartbeat
from lethe.activities.clients import Clients
from lethe.activities.common import (
    SchemaMismatch,
    verdict,
)
from lethe.activities.connector import Connector
from lethe.activities.driver_errors import lethe_error
from lethe.activities.kafka_retention import TopicRetention
from lethe.activities.kafka_scan import Match, ScanResult, TopicScan, reader
from lethe.classification.datamap import KafkaTopicLocator, MissingIdentity, render
from lethe.contracts import (
    Evidence,
    StepOutcome,
    StepRequest,
    StepStatus,
    SweepBatch,
    SweepResult,
)
from lethe.kernel.errors import ConfigurationError, LetheError, ServiceUnavailable

TIMEOUT_SECONDS = 15.0
"""How long one broker call (metadata, delivery, read) may take before Kafka counts as down."""
PREFLIGHT_TIMEOUT_SECONDS = 5.0
"""How long preflight waits for the cluster to answer: a plan shown to a DPO should not hang."""
REQUEST_HEADER = "lethe-request"
STEP_HEADER = "lethe-step"
"""The headers of a tombstone: the request and the step that wrote it (no personal data)."""
CLOCK_SKEW = timedelta(minutes=5)
"""How far before the erasure's start (the Temporal server's clock) the search for an earlier
tombstone begins: the tombstone's timestamp comes from the worker's (or the broker's) clock."""
SEARCH_SLICE_SECONDS = 5.0
"""How long the search for an earlier tombstone reads between two heartbeats."""
SEARCH_BATCH = 500
"""How many records the search takes from the consumer at a time."""
LONG_MAX = 9223372036854775807
"""Java's Long.MAX_VALUE: Kafka's `max.compaction.lag.ms` when compaction has no deadline."""
TOPIC_SETTINGS = (
    "cleanup.policy",
    "max.compaction.lag.ms",
    "delete.retention.ms",
    "retention.ms",
    "segment.ms",
)
BROKER_SETTINGS = ("log.cleaner.backoff.ms", "log.retention.check.interval.ms")
"""How often the broker looks for work: removal can lag a bound by up to these."""
KAFKA_DEFAULTS = {
    "cleanup.policy": "delete",
    "max.compaction.lag.ms": str(LONG_MAX),
    "delete.retention.ms": "86400000",
    "retention.ms": "604800000",
    "segment.ms": "604800000",
    "log.cleaner.backoff.ms": "15000",
    "log.retention.check.interval.ms": "300000",
}
"""What Kafka uses for a setting that nobody sets."""


# --- when are the subject's earlier records gone? (pure) ---------------------------------------


class Removal(NamedTuple):
    """By when the subject's earlier records are provably gone, and why (or why never)."""

    gone_by: datetime | None
    """None: the topic's settings never guarantee removal."""
    reason: str
    by_compaction: bool = False
    """The bound is the log cleaner's, which needs the tombstone's segment to have rolled."""
    cleaner_backoff_ms: int = 0
    """How long the cleaner may sleep before it notices a rolled segment."""


def _setting(settings: Mapping[str, str], name: str) -> int:
    return int(settings.get(name, KAFKA_DEFAULTS[name]))


def _after(start: datetime, milliseconds: int) -> datetime | None:
    try:
        return start + timedelta(milliseconds=milliseconds)
    except OverflowError:  # beyond year 9999: no bound worth the name
        return None


def _policies(settings: Mapping[str, str]) -> set[str]:
    value = settings.get("cleanup.policy", KAFKA_DEFAULTS["cleanup.policy"])
    return {part.strip() for part in value.split(",") if part.strip()}


def compaction_bound(settings: Mapping[str, str], tombstone_time: datetime) -> Removal:
    """When the log cleaner has compacted away records older than the tombstone, if ever."""
    lag = _setting(settings, "max.compaction.lag.ms")
    segment = _setting(settings, "segment.ms")
    backoff = _setting(settings, "log.cleaner.backoff.ms")
    if lag <= 0 or lag >= LONG_MAX:
        return Removal(
            None,
            f"cleanup.policy=compact with max.compaction.lag.ms={lag} (no bound) never forces "
            "compaction; set max.compaction.lag.ms",
        )
    # The cleaner never touches the active segment, and the tombstone only shadows earlier
    # records once its own segment has rolled (after segment.ms) and been cleaned (forced after
    # max.compaction.lag.ms, noticed within log.cleaner.backoff.ms).
    gone_by = _after(tombstone_time, max(segment, lag) + backoff)
    if gone_by is None:
        return Removal(None, f"cleanup.policy=compact with max.compaction.lag.ms={lag} is too long")
    return Removal(
        gone_by,
        "cleanup.policy=compact: the log cleaner removes earlier records with this key within "
        f"max(segment.ms={segment}, max.compaction.lag.ms={lag}) + "
        f"log.cleaner.backoff.ms={backoff} ms of the tombstone, once a later record has rolled "
        "its segment",
        by_compaction=True,
        cleaner_backoff_ms=backoff,
    )


def retention_bound(settings: Mapping[str, str], tombstone_time: datetime) -> Removal:
    """When retention has deleted every segment holding records older than the tombstone."""
    retention = _setting(settings, "retention.ms")
    segment = _setting(settings, "segment.ms")
    check = _setting(settings, "log.retention.check.interval.ms")
    if retention < 0:
        return Removal(
            None,
            f"cleanup.policy=delete with retention.ms={retention} never removes data; set "
            "max.compaction.lag.ms (with compact) or retention.ms",
        )
    # A segment holding an earlier record stops taking records within segment.ms of it, and is
    # deleted at the first retention check after its newest record is older than retention.ms.
    gone_by = _after(tombstone_time, retention + segment + check)
    if gone_by is None:
        return Removal(None, f"cleanup.policy=delete with retention.ms={retention} is too long")
    return Removal(
        gone_by,
        "cleanup.policy=delete: retention deletes every earlier record within "
        f"retention.ms={retention} + segment.ms={segment} + "
        f"log.retention.check.interval.ms={check} ms of the tombstone",
    )


def removal_deadline(settings: Mapping[str, str], tombstone_time: datetime) -> Removal:
    """By when the topic's settings guarantee the subject's pre-tombstone records are gone.

    `settings` holds the topic's and the broker's configuration values as Kafka reports them
    (strings); a missing one takes Kafka's default.
    """
    policies = _policies(settings)
    bounds: list[Removal] = []
    if "compact" in policies:
        bounds.append(compaction_bound(settings, tombstone_time))
    if "delete" in policies:
        bounds.append(retention_bound(settings, tombstone_time))
    if not bounds:
        shown = settings.get("cleanup.policy", "")
        return Removal(None, f"cleanup.policy={shown} neither compacts nor deletes")
    finite = [(bound.gone_by, bound) for bound in bounds if bound.gone_by is not None]
    if not finite:
        return Removal(None, "; ".join(bound.reason for bound in bounds))
    return min(finite, key=lambda pair: pair[0])[1]


def removal_status(
    removal: Removal,
    window_ends_at: datetime,
    now: datetime,
    segment_rolled_at: datetime | None = None,
) -> tuple[StepStatus, datetime | None, str]:
    """Kafka's honest status, with when the data is gone: `done` only once that is past.

    `segment_rolled_at` is when the first record arrived on the partition after the tombstone's
    segment was due to roll (None if none has); a compaction bound needs one, and the cleaner
    may then take `cleaner_backoff_ms` to notice the rolled segment.
    """
    gone_by = removal.gone_by
    if gone_by is None:
        return "at_risk", None, removal.reason
    if gone_by <= now and removal.by_compaction:
        if segment_rolled_at is None:
            return (
                "at_risk",
                gone_by,
                (
                    "no record has reached the partition since the tombstone's segment was due to "
                    "roll; Kafka rolls a segment, and only then compacts it, when a later record "
                    f"arrives: {removal.reason}"
                ),
            )
        gone_by = max(
            gone_by, segment_rolled_at + timedelta(milliseconds=removal.cleaner_backoff_ms)
        )
    if gone_by > window_ends_at:
        return (
            "at_risk",
            gone_by,
            (
                f"earlier records are gone only by {gone_by.isoformat()}, after the erasure window "
                f"ends at {window_ends_at.isoformat()}: {removal.reason}"
            ),
        )
    if gone_by > now:
        return (
            "pending_compaction",
            gone_by,
            (f"earlier records are gone by {gone_by.isoformat()}: {removal.reason}"),
        )
    return "done", None, f"earlier records were gone by {gone_by.isoformat()}: {removal.reason}"


# --- where a key's records are (pure) ---------------------------------------------------------


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash of `data` (the Java client's `Utils.murmur2`), as 32 unsigned bits."""
    mask, m = 0xFFFFFFFF, 0x5BD1E995
    length = len(data)
    h = (0x9747B28C ^ length) & mask
    whole = length - length % 4
    for i in range(0, whole, 4):
        k = (int.from_bytes(data[i : i + 4], "little") * m) & mask
        k = ((k ^ (k >> 24)) * m) & mask
        h = ((h * m) & mask) ^ k
    tail = data[whole:]
    if len(tail) == 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if tail:
        h = ((h ^ tail[0]) * m) & mask
    h = ((h ^ (h >> 13)) * m) & mask
    return h ^ (h >> 15)


def partition_of(key: bytes, partitions: int) -> int:
    """The partition a Java producer (and librdkafka's `murmur2_random`) puts `key` on."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


# --- the connector ---------------------------------------------------------------------------


T = TypeVar("T")


@dataclass(frozen=True)
class _Delivery:
    partition: int
    offset: int
    timestamp_ms: int


@dataclass(frozen=True)
class _Read:
    low: int
    high: int
    offset: int | None
    """The first offset at or after the tombstone's that is still in the log."""
    key_matches: bool = False
    is_tombstone: bool = False


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _key(request: StepRequest) -> tuple[str, bytes]:
    locator = TombstoneWriter.locator(request)
    if locator.key_template is None:
        raise ConfigurationError(f"step {request.step.id!r}: the topic is not keyed by subject")
    values = request.subject.template_values(request.subject_ref)
    return locator.topic, render(locator.key_template, values).encode()


def _match(request: StepRequest) -> Match:
    """How the scan of a topic keyed by something else knows the subject's records."""
    locator = TombstoneWriter.locator(request)
    if locator.value_field is None:
        raise ConfigurationError(f"step {request.step.id!r}: the topic has no value_field")
    values = request.subject.template_values(request.subject_ref)
    return Match(
        value_field=locator.value_field,
        value=render(locator.value_template, values),
        tenant_field=locator.tenant_field,
        tenant=request.subject.tenant,
    )


def _not_compacted(where: str, settings: Mapping[str, str]) -> str:
    policy = settings.get("cleanup.policy", KAFKA_DEFAULTS["cleanup.policy"])
    return (
        f"{where} has cleanup.policy={policy}: a tombstone removes nothing from a topic that is "
        "not compacted, so it cannot be edited per subject; map it with removal: retention"
    )


def _expiry(settings: Mapping[str, str], erasure_started_at: datetime) -> Removal:
    """By when retention has removed every record older than the erasure, if it ever does."""
    if "delete" not in _policies(settings):
        policy = settings.get("cleanup.policy", KAFKA_DEFAULTS["cleanup.policy"])
        return Removal(
            None,
            f"cleanup.policy={policy} deletes nothing by age, so retention never removes the "
            "subject's records; set cleanup.policy=delete with a retention.ms",
        )
    return retention_bound(settings, erasure_started_at)


def _marks(request: StepRequest) -> list[tuple[str, bytes]]:
    """The headers that tie a tombstone to its request and step."""
    return [
        (REQUEST_HEADER, request.request_id.encode()),
        (STEP_HEADER, request.step.id.encode()),
    ]


def _heartbeat(topic: str, partition: int, offset: int) -> None:
    """Tell a later attempt where to look: this step's tombstone, if any, is at or after
    `offset` in `partition` (nothing of it is earlier). Outside an activity, nothing."""
    heartbeat({"topic": topic, "partition": partition, "offset": offset})


def _earlier_attempt(topic: str, partition: int) -> int | None:
    """Where an earlier attempt's last heartbeat says this step's tombstone can start, if it
    left one for this topic and partition (heartbeats are best-effort: often there is none)."""
    if not activity.in_activity():
        return None
    details = activity.info().heartbeat_details
    last = details[-1] if details else None
    if not isinstance(last, dict):
        return None
    offset = last.get("offset")
    if (
        last.get("topic") != topic
        or last.get("partition") != partition
        or not isinstance(offset, int)
        or isinstance(offset, bool)
        or offset < 0
    ):
        return None
    return offset


class _TombstoneSearch:
    """Reads one partition from a starting offset up to its end when the search began, looking
    for the tombstone of one request and step for one key (blocking: runs in a thread). It
    compares keys, headers and whether a value is there; values are never kept or shown."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        partition: int,
        key: bytes,
        marks: Sequence[tuple[str, bytes]],
    ) -> None:
        self._bootstrap, self._topic, self._partition, self._key = bootstrap, topic, partition, key
        self._marks = list(marks)
        self._consumer = reader(bootstrap, "lethe-erase", partition_eof=True)
        self.next = 0
        """The first offset not read yet: nothing of the step's before it."""
        self.end = 0
        """The partition's high watermark when the search began: where it stops."""

    @property
    def finished(self) -> bool:
        """Everything from the start to the end has been read."""
        return self.next >= self.end

    def start(self, since_ms: int, earlier: int | None) -> None:
        """Bound the search: from `earlier` (an earlier attempt's heartbeat) when it fits the
        partition, else from the first record stamped at or after `since_ms`."""
        place = TopicPartition(self._topic, self._partition)
        low, high = self._consumer.get_watermark_offsets(place, timeout=TIMEOUT_SECONDS)
        if earlier is not None and earlier <= high:
            begin = earlier
        else:  # no heartbeat, or one from before the topic was recreated
            [stamped] = self._consumer.offsets_for_times(
                [TopicPartition(self._topic, self._partition, since_ms)], timeout=TIMEOUT_SECONDS
            )
            if stamped.error is not None:
                raise KafkaException(stamped.error)
            begin = stamped.offset if stamped.offset >= 0 else high
        self.next, self.end = max(begin, low), high
        if not self.finished:
            self._consumer.assign([TopicPartition(self._topic, self._partition, self.next)])

    def read(self, seconds: float) -> _Delivery | None:
        """Read on for up to `seconds`: the step's tombstone if found, else None."""
        now = time.monotonic()
        stop, idle_until = now + seconds, now + TIMEOUT_SECONDS
        last_error = ""
        while not self.finished and time.monotonic() < stop:
            # No more than are left, so the last batch need not wait out the timeout to fill.
            wanted = min(SEARCH_BATCH, self.end - self.next)
            messages = self._consumer.consume(wanted, timeout=0.5)
            if not messages:
                if time.monotonic() > idle_until:
                    raise ServiceUnavailable(
                        f"Kafka at {self._bootstrap}: no record read in time while looking for "
                        f"an earlier tombstone {last_error}".strip()
                    )
                continue
            idle_until = time.monotonic() + TIMEOUT_SECONDS
            for message in messages:
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        self.next = self.end  # compaction left a gap up to the end
                        return None
                    last_error = error.name()
                    continue
                found = self._match(message)
                if found is not None:
                    return found
                if self.finished:
                    return None
        return None

    def _match(self, message: Message) -> _Delivery | None:
        offset = message.offset()
        if offset is None:
            return None
        if offset >= self.end:
            self.next = self.end
            return None
        self.next = offset + 1
        if message.key() != self._key or message.value() is not None:
            return None
        headers = message.headers() or []
        pairs = list(headers.items()) if isinstance(headers, dict) else headers
        if not all(mark in pairs for mark in self._marks):
            return None
        kind, stamp = message.timestamp()
        if kind == TIMESTAMP_NOT_AVAILABLE:
            stamp = int(time.time() * 1000)
        return _Delivery(partition=self._partition, offset=offset, timestamp_ms=stamp)

    def close(self) -> None:
        """Close the consumer."""
        self._consumer.close()


class TombstoneWriter(Connector[KafkaTopicLocator]):
    """Tombstones the subject's records in a compacted topic, or dates their expiry."""

    kind = "kafka"
    locator_model = KafkaTopicLocator
    actions = ("tombstone", "expire")
    checks = (
        "the cluster answers; the topic exists; the key or value template fills; what the "
        "broker lets this worker do (write, read, describe configs); compaction for value_field"
    )
    proves = (
        "the tombstone is the key's latest record, and the topic's compaction or retention "
        "settings remove what it shadows by the end of the window (else pending_compaction or "
        "at_risk, never done)"
    )
    retries = "the tombstone found again by its lethe-request and lethe-step headers"
    sweeps = (
        "retention.ms, cleanup.policy, max.compaction.lag.ms and delete.retention.ms against "
        "the rules (drift), changed with apply by incremental alter-configs"
    )

    def __init__(self, clients: Clients, bootstrap: str) -> None:
        """Use the worker's producer and admin client of the cluster at `bootstrap`."""
        self._clients = clients
        self._bootstrap = bootstrap
        self._producer = clients.kafka_producer(bootstrap, TIMEOUT_SECONDS)
        self._admin = clients.kafka_admin(bootstrap)

    @classmethod
    def open(cls, clients: Clients, connection: str) -> Self:
        """A writer for the cluster whose bootstrap servers are `connection`."""
        return cls(clients, connection)

    async def erase(self, request: StepRequest) -> StepOutcome:
        """Write a tombstone for the subject's key; `running` until verify sees removal is due."""
        locator = self.locator(request)
        if locator.removal == "retention":
            return await self._expire(request)
        if locator.value_field is not None:
            return await self._erase_by_value(request)
        topic, key = _key(request)
        # Reading the settings first also proves the topic exists, so a wrong name in the data
        # map cannot make the broker auto-create a topic when the tombstone is produced.
        settings = await self._settings(request, topic)
        # The tombstone goes to the partition a Java producer puts the key on, named explicitly
        # so that it is the partition searched (and heartbeated) whatever the producer's
        # metadata says.
        partition = partition_of(key, await self._partition_count(request, topic))
        earlier, searched_to = await self._earlier_tombstone(request, topic, partition, key)
        if earlier is not None:
            delivery, what = earlier, "tombstone of an earlier attempt found, none written"
        else:
            # A crash after the delivery leaves this for the retry: look from here on.
            _heartbeat(topic, partition, searched_to)
            delivery = await asyncio.to_thread(
                self._produce_tombstone, topic, key, partition, _marks(request)
            )
            what = "tombstone written"
        removal = removal_deadline(settings, _from_ms(delivery.timestamp_ms))
        return StepOutcome(
            step_id=request.step.id,
            status="running",
            affected=1,
            evidence={
                "topic": topic,
                "partition": delivery.partition,
                "offset": delivery.offset,
                "tombstone_time_ms": delivery.timestamp_ms,
                "tombstone_reused": earlier is not None,
                **_settings_evidence(settings),
            },
            detail=f"{what}; {removal.reason}",
            gone_by=removal.gone_by,
        )

    async def preflight(self, request: StepRequest) -> list[str]:
        """Check, touching nothing, that the cluster answers (else ServiceUnavailable, within
        seconds), the topic exists, the key template fills from the request, and, where the
        broker reports what this worker may do, that it may write, read and describe the topic.
        Problems name the system and the topic, never the key."""
        step = request.step
        locator = self.locator(request)
        topic = locator.topic
        where = f"Kafka topic {topic!r} of system {step.system!r}"
        problems: list[str] = []
        try:
            if locator.key_template is not None:
                _key(request)
            elif locator.value_field is not None:
                _match(request)
        except MissingIdentity as exc:  # it names the placeholder, not a value
            problems.append(f"the key or value template of {where} cannot be filled: {exc}")
        try:
            described = await self._topic(topic, PREFLIGHT_TIMEOUT_SECONDS, authorized=True)
        except KafkaException as exc:
            code = _code(exc)
            if code == KafkaError.UNKNOWN_TOPIC_OR_PART:
                return [*problems, f"{where} does not exist (Lethe never creates topics)"]
            if code == KafkaError.TOPIC_AUTHORIZATION_FAILED:
                return [*problems, f"{where}: this worker may not describe it"]
            raise self._unavailable(exc) from None
        # None: the broker does not say (no authorizer reports all operations as allowed).
        allowed = set(getattr(described, "authorized_operations", None) or ())
        if allowed and AclOperation.ALL not in allowed:
            for operation, what in (
                (AclOperation.WRITE, "write the tombstone"),
                (AclOperation.READ, "read it back or look for an earlier one"),
                (AclOperation.DESCRIBE_CONFIGS, "read the topic's settings"),
            ):
                if operation not in allowed:
                    problems.append(
                        f"{where}: this worker may not {what} ({operation.name} is not granted)"
                    )
        if locator.value_field is not None:
            settings = await self._settings(request, topic)
            if "compact" not in _policies(settings):
                problems.append(_not_compacted(where, settings))
        return problems

    async def verify(self, request: StepRequest, erased: StepOutcome) -> StepOutcome:
        """Read the tombstone back and judge the topic's settings against the erasure window."""
        locator = self.locator(request)
        if locator.removal == "retention":
            return await self._verify_expiry(request, erased)
        if locator.value_field is not None:
            return await self._verify_by_value(request, erased)
        topic, key = _key(request)
        partition = erased.evidence.get("partition")
        offset = erased.evidence.get("offset")
        tombstone_ms = erased.evidence.get("tombstone_time_ms")
        if not (
            isinstance(partition, int) and isinstance(offset, int) and isinstance(tombstone_ms, int)
        ):
            return verdict(
                erased,
                erased.evidence,
                ["the erase outcome records no tombstone partition, offset, time"],
            )
        settings = await self._settings(request, topic)
        read = await asyncio.to_thread(self._read_at, topic, partition, offset, key)
        evidence: Evidence = {
            **erased.evidence,
            **_settings_evidence(settings),
            "low_watermark": read.low,
            "high_watermark": read.high,
        }
        if read.offset is None or (
            read.offset == offset and not (read.key_matches and read.is_tombstone)
        ):
            return verdict(
                erased,
                evidence,
                [
                    f"the record at partition {partition} offset {offset} is not the tombstone "
                    "erase wrote (was the topic recreated?)"
                ],
            )
        # A tombstone no longer in the log was itself removed by compaction or retention: fine.
        evidence["tombstone_present"] = read.offset == offset
        return await self._judged(request, erased, evidence, settings, tombstone_ms, [partition])

    async def sweep(self, batch: SweepBatch) -> SweepResult:
        """The task's topic settings against its retention rules: drift reported and, with
        `apply`, changed (`lethe.activities.kafka_retention`)."""
        return await TopicRetention(self._admin, self._bootstrap, TIMEOUT_SECONDS).sweep(batch)

    async def _expire(self, request: StepRequest) -> StepOutcome:
        """Nothing written: when the topic's retention has removed what predates the erasure."""
        topic = TombstoneWriter.locator(request).topic
        settings = await self._settings(request, topic)
        removal = _expiry(settings, _utc(request.erasure_started_at))
        return StepOutcome(
            step_id=request.step.id,
            status="running",
            evidence={"topic": topic, "written": 0, **_settings_evidence(settings)},
            detail=f"nothing written (the topic cannot be edited per subject); {removal.reason}",
            gone_by=removal.gone_by,
        )

    async def _verify_expiry(self, request: StepRequest, erased: StepOutcome) -> StepOutcome:
        """The topic's settings now (they may have changed) against the erasure window."""
        topic = TombstoneWriter.locator(request).topic
        settings = await self._settings(request, topic)
        removal = _expiry(settings, _utc(request.erasure_started_at))
        status, gone_by, detail = removal_status(
            removal, _utc(request.window_ends_at), datetime.now(UTC)
        )
        return StepOutcome(
            step_id=request.step.id,
            status=status,
            verified=True,
            evidence={**erased.evidence, **_settings_evidence(settings)},
            detail=f"removal by the topic's retention: {detail}",
            gone_by=gone_by,
        )

    async def _erase_by_value(self, request: StepRequest) -> StepOutcome:
        """A tombstone for each key whose latest record is the subject's (read from the topic)."""
        topic = TombstoneWriter.locator(request).topic
        settings = await self._settings(request, topic)
        if "compact" not in _policies(settings):
            where = f"Kafka topic {topic!r} of system {request.step.system!r}"
            raise SchemaMismatch(_not_compacted(where, settings))
        scan = await self._scan(request, topic)
        written = []
        for key, latest in sorted(scan.to_tombstone().items(), key=lambda item: item[1].offset):
            # On the partition of the key's records, wherever a producer's partitioner put them.
            written.append(
                await asyncio.to_thread(
                    self._produce_tombstone, topic, key, latest.partition, _marks(request)
                )
            )
        reused = scan.tombstoned_before()
        stones = sorted(
            [(d.partition, d.offset, d.timestamp_ms) for d in written]
            + [(r.partition, r.offset, r.timestamp_ms) for r in reused]
        )
        last_ms = max((stamp for _, _, stamp in stones), default=int(time.time() * 1000))
        removal = removal_deadline(settings, _from_ms(last_ms))
        superseded = scan.superseded()
        found = bool(stones) or superseded > 0
        return StepOutcome(
            step_id=request.step.id,
            status="running",
            affected=len(stones),
            evidence={
                "topic": topic,
                "tombstones": json.dumps([[p, o] for p, o, _ in stones]),
                "tombstone_time_ms": last_ms,
                "keys_tombstoned": len(written),
                "keys_reused": len(reused),
                "keys_superseded": superseded,
                "records_read": scan.records,
                "records_unreadable": scan.unreadable,
                **_settings_evidence(settings),
            },
            detail=(
                f"{len(written)} tombstone(s) written, {len(reused)} of an earlier attempt found, "
                f"{superseded} key(s) no longer the subject's; {removal.reason}"
                if found
                else "no record of the subject in the topic"
            ),
            gone_by=removal.gone_by if found else None,
        )

    async def _verify_by_value(self, request: StepRequest, erased: StepOutcome) -> StepOutcome:
        """Read the topic again: no key's latest record is the subject's; then the deadline."""
        topic = TombstoneWriter.locator(request).topic
        settings = await self._settings(request, topic)
        scan = await self._scan(request, topic)
        still = scan.still_the_subjects()
        evidence: Evidence = {
            **erased.evidence,
            **_settings_evidence(settings),
            "keys_still_the_subjects": len(still),
            "records_unreadable": scan.unreadable,
        }
        if still:
            return verdict(
                erased,
                evidence,
                [
                    f"{len(still)} key(s) of topic {topic!r} still have a record of the subject "
                    "as their latest (written after the erasure began?)"
                ],
            )
        if scan.unreadable:
            return StepOutcome(
                step_id=erased.step_id,
                status="at_risk",
                affected=erased.affected,
                verified=True,
                evidence=evidence,
                detail=(
                    f"{scan.unreadable} record(s) of topic {topic!r} are not JSON objects: "
                    "nobody can tell whether they are the subject's"
                ),
            )
        if not erased.affected and not erased.evidence.get("keys_superseded"):
            return verdict(erased, evidence, [], "no record of the subject in the topic")
        tombstone_ms = erased.evidence.get("tombstone_time_ms")
        recorded = erased.evidence.get("tombstones")
        if not (isinstance(tombstone_ms, int) and isinstance(recorded, str)):
            return verdict(erased, evidence, ["the erase outcome records no tombstones"])
        partitions = sorted({int(pair[0]) for pair in json.loads(recorded)})
        return await self._judged(request, erased, evidence, settings, tombstone_ms, partitions)

    async def _judged(
        self,
        request: StepRequest,
        erased: StepOutcome,
        evidence: Evidence,
        settings: Mapping[str, str],
        tombstone_ms: int,
        partitions: Sequence[int],
    ) -> StepOutcome:
        """The verified step's status: when the settings remove what the tombstones (the last
        at `tombstone_ms`, in `partitions`) cover, against the erasure window."""
        removal = removal_deadline(settings, _from_ms(tombstone_ms))
        now = datetime.now(UTC)
        rolled_at: datetime | None = None
        if removal.by_compaction and removal.gone_by is not None and removal.gone_by <= now:
            due_ms = tombstone_ms + _setting(settings, "segment.ms")
            topic = TombstoneWriter.locator(request).topic
            rolled_at = await self._all_rolled(topic, partitions, due_ms)
            evidence["segment_rolled"] = rolled_at is not None
        status, gone_by, detail = removal_status(
            removal, _utc(request.window_ends_at), now, rolled_at
        )
        return StepOutcome(
            step_id=erased.step_id,
            status=status,
            affected=erased.affected,
            verified=True,
            evidence=evidence,
            detail=detail,
            gone_by=gone_by,
        )

    async def _all_rolled(
        self, topic: str, partitions: Sequence[int], due_ms: int
    ) -> datetime | None:
        """When a record stamped at or after `due_ms` reached the last of `partitions`, so that
        each has rolled the segment holding its tombstone (None while one has not)."""
        moments = [await self._first_record_since(topic, p, due_ms) for p in partitions]
        if not moments or any(moment is None for moment in moments):
            return None
        return max(moment for moment in moments if moment is not None)

    async def _scan(self, request: StepRequest, topic: str) -> ScanResult:
        """The whole topic read for the subject's records, heartbeating between slices."""
        count = await self._partition_count(request, topic)
        scan = await self._in_thread(
            TopicScan,
            self._bootstrap,
            topic,
            count,
            _match(request),
            _marks(request),
            TIMEOUT_SECONDS,
        )
        try:
            await self._in_thread(scan.start)
            while not scan.finished:
                await self._in_thread(scan.read, SEARCH_SLICE_SECONDS)
                heartbeat({"topic": topic, "records_read": scan.result.records})
            return scan.result
        finally:
            await asyncio.to_thread(scan.close)

    async def _settings(self, request: StepRequest, topic: str) -> dict[str, str]:
        """The topic's settings and the broker's, or SchemaMismatch if the topic is missing."""
        try:
            entries = await self._described(ConfigResource(ResourceType.TOPIC, topic))
        except KafkaException as exc:
            raise self._topic_error(request, topic, exc) from None
        settings = {name: entries[name] for name in TOPIC_SETTINGS if name in entries}
        return {**await self._broker_settings(), **settings}

    async def _partition_count(self, request: StepRequest, topic: str) -> int:
        try:
            described = await self._topic(topic, TIMEOUT_SECONDS)
        except KafkaException as exc:
            raise self._topic_error(request, topic, exc) from None
        count = len(described.partitions)
        if count < 1:
            raise ServiceUnavailable(f"Kafka at {self._bootstrap}: topic without partitions")
        return count

    async def _topic(self, topic: str, timeout: float, *, authorized: bool = False) -> Any:
        """The topic's description (never creates it); KafkaException as the broker answers."""
        futures = self._admin.describe_topics(
            TopicCollection([topic]),
            request_timeout=timeout,
            include_authorized_operations=authorized,
        )
        return await self._admin_result(futures[topic], timeout + 1)

    async def _earlier_tombstone(
        self, request: StepRequest, topic: str, partition: int, key: bytes
    ) -> tuple[_Delivery | None, int]:
        """This request's and step's tombstone for `key`, if an earlier attempt wrote one; and
        the offset the search read up to (nothing of the step's is before it).

        The search starts where an earlier attempt's heartbeat says it was about to produce,
        else at the first record stamped after the erasure began (less the clock skew allowed),
        and ends at the partition's end when it began; it heartbeats as it reads.
        """
        since = _utc(request.erasure_started_at) - CLOCK_SKEW
        since_ms = int(since.timestamp() * 1000)
        earlier = _earlier_attempt(topic, partition)
        search = await self._in_thread(
            _TombstoneSearch, self._bootstrap, topic, partition, key, _marks(request)
        )
        try:
            await self._in_thread(search.start, since_ms, earlier)
            while not search.finished:
                found = await self._in_thread(search.read, SEARCH_SLICE_SECONDS)
                if found is not None:
                    return found, found.offset
                if not search.finished:
                    _heartbeat(topic, partition, search.next)
            return None, search.end
        finally:
            await asyncio.to_thread(search.close)

    async def _in_thread(self, work: Callable[..., T], *args: Any) -> T:
        """Run blocking client work in a thread; Kafka's own errors as ServiceUnavailable."""
        try:
            return await asyncio.to_thread(work, *args)
        except KafkaException as exc:
            raise self._unavailable(exc) from None

    async def _broker_settings(self) -> dict[str, str]:
        """How often the brokers clean and apply retention: read once per cluster, the slowest."""
        cached = self._clients.kafka_brokers.get(self._bootstrap)
        if cached is not None:
            return cached
        try:
            cluster = await self._admin_result(
                self._admin.describe_cluster(request_timeout=TIMEOUT_SECONDS)
            )
            described = await asyncio.gather(
                *(
                    self._described(ConfigResource(ResourceType.BROKER, str(node.id)))
                    for node in cluster.nodes
                )
            )
        except KafkaException as exc:
            if _code(exc) != KafkaError.CLUSTER_AUTHORIZATION_FAILED:
                raise self._unavailable(exc) from None
            described = []  # not allowed to read them: Kafka's defaults stand in
        slowest = {
            name: str(max(int(entries[name]) for entries in described if name in entries))
            for name in BROKER_SETTINGS
            if any(name in entries for entries in described)
        }
        self._clients.kafka_brokers[self._bootstrap] = slowest
        return slowest

    async def _described(self, resource: ConfigResource) -> dict[str, str]:
        futures = self._admin.describe_configs([resource], request_timeout=TIMEOUT_SECONDS)
        entries = await self._admin_result(next(iter(futures.values())))
        return {name: entry.value for name, entry in entries.items() if entry.value is not None}

    async def _first_record_since(
        self, topic: str, partition: int, timestamp_ms: int
    ) -> datetime | None:
        """When the first record stamped at or after `timestamp_ms` reached the partition."""
        spec = {TopicPartition(topic, partition): OffsetSpec.for_timestamp(timestamp_ms)}
        futures = self._admin.list_offsets(spec, request_timeout=TIMEOUT_SECONDS)
        try:
            info = await self._admin_result(next(iter(futures.values())))
        except KafkaException as exc:
            raise self._unavailable(exc) from None
        return _from_ms(info.timestamp) if info.offset >= 0 else None

    async def _admin_result(self, future: Any, timeout: float | None = None) -> Any:
        try:
            async with asyncio.timeout(TIMEOUT_SECONDS + 1 if timeout is None else timeout):
                return await asyncio.wrap_future(future)
        except TimeoutError:
            raise ServiceUnavailable(f"Kafka at {self._bootstrap}: TimeoutError") from None

    def _produce_tombstone(
        self, topic: str, key: bytes, partition: int, headers: Sequence[tuple[str, bytes]]
    ) -> _Delivery:
        """Produce and flush a tombstone to `partition` with `headers` (blocking: runs in a
        thread); where it landed, once the broker has acknowledged it."""
        reported = threading.Event()
        reports: list[tuple[KafkaError | None, Message]] = []

        def on_delivery(error: KafkaError | None, message: Message) -> None:
            reports.append((error, message))
            reported.set()

        try:
            self._producer.produce(
                topic,
                key=key,
                value=None,
                partition=partition,
                headers=list(headers),
                on_delivery=on_delivery,
            )
        except (BufferError, KafkaException) as exc:
            raise self._unavailable(exc) from None
        self._producer.flush(TIMEOUT_SECONDS + 5)
        # Another thread's flush may be the one serving our report, so wait for it as well.
        if not reported.wait(5.0):
            raise ServiceUnavailable(f"Kafka at {self._bootstrap}: no delivery report")
        error, message = reports[0]
        if error is not None:
            if error.fatal():
                # An idempotent producer cannot recover: the next step gets a new one.
                self._clients.drop_kafka_producer(self._bootstrap)
            raise ServiceUnavailable(f"Kafka at {self._bootstrap}: delivery failed {error.name()}")
        landed, offset = message.partition(), message.offset()
        kind, stamp = message.timestamp()
        if landed is None or offset is None:
            raise ServiceUnavailable(f"Kafka at {self._bootstrap}: delivery report without offset")
        if kind == TIMESTAMP_NOT_AVAILABLE:
            stamp = int(time.time() * 1000)
        return _Delivery(partition=landed, offset=offset, timestamp_ms=stamp)

    def _read_at(self, topic: str, partition: int, offset: int, key: bytes) -> _Read:
        """Read the first record at or after `offset` with a throwaway consumer (blocking)."""
        consumer = reader(self._bootstrap, "lethe-verify")
        try:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=TIMEOUT_SECONDS
            )
            if offset < low:
                return _Read(low=low, high=high, offset=low)
            if offset >= high:
                return _Read(low=low, high=high, offset=None)
            consumer.assign([TopicPartition(topic, partition, offset)])
            deadline = time.monotonic() + TIMEOUT_SECONDS
            while time.monotonic() < deadline:
                message = consumer.poll(0.5)
                if message is None or message.error() is not None:
                    continue
                return _Read(
                    low=low,
                    high=high,
                    offset=message.offset(),
                    key_matches=message.key() == key,
                    is_tombstone=message.value() is None,
                )
            raise ServiceUnavailable(f"Kafka at {self._bootstrap}: no record read in time")
        except KafkaException as exc:
            raise self._unavailable(exc) from None
        finally:
            consumer.close()

    def _topic_error(self, request: StepRequest, topic: str, exc: KafkaException) -> LetheError:
        """A failed look at the step's topic: SchemaMismatch if it does not exist, else the
        cluster is unavailable."""
        if _code(exc) == KafkaError.UNKNOWN_TOPIC_OR_PART:
            return SchemaMismatch(
                f"Kafka topic {topic!r} of system {request.step.system!r} does not exist"
            )
        return self._unavailable(exc)

    def _unavailable(self, exc: BaseException) -> LetheError:
        # librdkafka's messages can quote keys: only the error's type and code name leave here.
        return lethe_error(exc, f"Kafka at {self._bootstrap}") or ServiceUnavailable(
            f"Kafka at {self._bootstrap} did not answer ({type(exc).__name__})"
        )


def _from_ms(milliseconds: int) -> datetime:
    return datetime.fromtimestamp(milliseconds / 1000, UTC)


def _code(exc: KafkaException) -> int | None:
    error = exc.args[0] if exc.args else None
    return error.code() if isinstance(error, KafkaError) else None


def _settings_evidence(settings: Mapping[str, str]) -> Evidence:
    evidence: Evidence = {
        "cleanup_policy": settings.get("cleanup.policy", KAFKA_DEFAULTS["cleanup.policy"])
    }
    for name in (*TOPIC_SETTINGS[1:], *BROKER_SETTINGS):
        evidence[name.replace(".", "_")] = _setting(settings, name)
    return evidence
