"""The Kafka connector: tombstones the subject's key and works out when earlier records are gone.

A tombstone (a record with the subject's key and no value) tells consumers to drop the key at
once, but the subject's earlier records stay in the log until the log cleaner compacts them or
retention deletes their segment. When that is guaranteed depends on the topic's settings, so
erase records where the tombstone went and `removal_deadline` computes the bound from the
settings; verify reads the tombstone back and compares the bound with the erasure window.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    OffsetSpec,
    ResourceType,
)

from activities.common import (
    SchemaMismatch,
    connector_activities,
    retained_outcome,
    verdict,
)
from classification.datamap import KafkaTopicLocator, render
from lethe.contracts import Evidence, StepOutcome, StepRequest, StepStatus
from lethe.errors import ConfigurationError, LetheError, ServiceUnavailable

TIMEOUT_SECONDS = 15.0
"""How long one broker call (metadata, delivery, read) may take before Kafka counts as down."""
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


# --- the connector ---------------------------------------------------------------------------


_producers: dict[str, Producer] = {}
_admins: dict[str, AdminClient] = {}
_brokers: dict[str, dict[str, str]] = {}
"""The brokers' settings per cluster: static broker configuration, read once."""


def producer(bootstrap: str) -> Producer:
    """The shared idempotent producer for `bootstrap`, created on first use."""
    found = _producers.get(bootstrap)
    if found is None:
        found = _producers[bootstrap] = Producer(
            {
                "bootstrap.servers": bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                # The Java client's partitioner: the tombstone must land on the partition that
                # holds the key's earlier records, or it shadows nothing.
                "partitioner": "murmur2_random",
                "message.timeout.ms": int(TIMEOUT_SECONDS * 1000),
            }
        )
    return found


def admin_client(bootstrap: str) -> AdminClient:
    """The shared admin client for `bootstrap`, created on first use."""
    found = _admins.get(bootstrap)
    if found is None:
        found = _admins[bootstrap] = AdminClient({"bootstrap.servers": bootstrap})
    return found


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
    locator = request.step.locator
    if not isinstance(locator, KafkaTopicLocator):
        raise ConfigurationError(
            f"step {request.step.id!r} is a Kafka step but its locator is not a Kafka topic"
        )
    values = request.subject.template_values(request.subject_ref)
    return locator.topic, render(locator.key_template, values).encode()


class TombstoneWriter:
    """Erases and verifies one Kafka step: a tombstone for the subject's key, then its deadline."""

    def __init__(self, bootstrap: str) -> None:
        """Use the shared producer and admin client of the cluster at `bootstrap`."""
        self._bootstrap = bootstrap
        self._producer = producer(bootstrap)
        self._admin = admin_client(bootstrap)

    @classmethod
    def for_connection(cls, bootstrap: str) -> TombstoneWriter:
        """A writer for the cluster whose bootstrap servers are `bootstrap`."""
        return cls(bootstrap)

    async def erase(self, request: StepRequest) -> StepOutcome:
        """Write a tombstone for the subject's key; `running` until verify sees removal is due."""
        step = request.step
        if step.action == "retain":
            return retained_outcome(request)
        topic, key = _key(request)
        # Reading the settings first also proves the topic exists, so a wrong name in the data
        # map cannot make the broker auto-create a topic when the tombstone is produced.
        settings = await self._settings(request, topic)
        # Erasing twice writes two tombstones for the same key: harmless, the later one shadows
        # the earlier and compaction keeps at most the last.
        delivery = await asyncio.to_thread(self._produce_tombstone, topic, key)
        removal = removal_deadline(settings, _from_ms(delivery.timestamp_ms))
        return StepOutcome(
            step_id=step.id,
            status="running",
            affected=1,
            evidence={
                "topic": topic,
                "partition": delivery.partition,
                "offset": delivery.offset,
                "tombstone_time_ms": delivery.timestamp_ms,
                **_settings_evidence(settings),
            },
            detail=f"tombstone written; {removal.reason}",
            gone_by=removal.gone_by,
        )

    async def verify(self, request: StepRequest, erased: StepOutcome) -> StepOutcome:
        """Read the tombstone back and judge the topic's settings against the erasure window."""
        step = request.step
        if step.action == "retain":
            return retained_outcome(request)
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
        removal = removal_deadline(settings, _from_ms(tombstone_ms))
        now = datetime.now(UTC)
        rolled_at: datetime | None = None
        if removal.by_compaction and removal.gone_by is not None and removal.gone_by <= now:
            due_ms = tombstone_ms + _setting(settings, "segment.ms")
            rolled_at = await self._first_record_since(topic, partition, due_ms)
            evidence["segment_rolled"] = rolled_at is not None
        status, gone_by, detail = removal_status(
            removal, _utc(request.window_ends_at), now, rolled_at
        )
        return StepOutcome(
            step_id=step.id,
            status=status,
            affected=erased.affected,
            verified=True,
            evidence=evidence,
            detail=detail,
            gone_by=gone_by,
        )

    async def _settings(self, request: StepRequest, topic: str) -> dict[str, str]:
        """The topic's settings and the broker's, or SchemaMismatch if the topic is missing."""
        try:
            entries = await self._described(ConfigResource(ResourceType.TOPIC, topic))
        except KafkaException as exc:
            if _code(exc) == KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise SchemaMismatch(
                    f"Kafka topic {topic!r} of system {request.step.system!r} does not exist"
                ) from None
            raise self._unavailable(exc) from None
        settings = {name: entries[name] for name in TOPIC_SETTINGS if name in entries}
        return {**await self._broker_settings(), **settings}

    async def _broker_settings(self) -> dict[str, str]:
        """How often the brokers clean and apply retention: read once per cluster, the slowest."""
        cached = _brokers.get(self._bootstrap)
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
        _brokers[self._bootstrap] = slowest
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

    async def _admin_result(self, future: Any) -> Any:
        try:
            async with asyncio.timeout(TIMEOUT_SECONDS + 1):
                return await asyncio.wrap_future(future)
        except TimeoutError:
            raise ServiceUnavailable(f"Kafka at {self._bootstrap}: TimeoutError") from None

    def _produce_tombstone(self, topic: str, key: bytes) -> _Delivery:
        """Produce and flush a tombstone (blocking: runs in a thread)."""
        reported = threading.Event()
        reports: list[tuple[KafkaError | None, Message]] = []

        def on_delivery(error: KafkaError | None, message: Message) -> None:
            reports.append((error, message))
            reported.set()

        try:
            self._producer.produce(topic, key=key, value=None, on_delivery=on_delivery)
        except (BufferError, KafkaException) as exc:
            raise self._unavailable(exc) from None
        self._producer.flush(TIMEOUT_SECONDS + 5)
        # Another thread's flush may be the one serving our report, so wait for it as well.
        if not reported.wait(5.0):
            raise ServiceUnavailable(f"Kafka at {self._bootstrap}: no delivery report")
        error, message = reports[0]
        if error is not None:
            if error.fatal():
                _producers.pop(self._bootstrap, None)  # an idempotent producer cannot recover
            raise ServiceUnavailable(f"Kafka at {self._bootstrap}: delivery failed {error.name()}")
        partition, offset = message.partition(), message.offset()
        kind, stamp = message.timestamp()
        if partition is None or offset is None:
            raise ServiceUnavailable(f"Kafka at {self._bootstrap}: delivery report without offset")
        if kind == TIMESTAMP_NOT_AVAILABLE:
            stamp = int(time.time() * 1000)
        return _Delivery(partition=partition, offset=offset, timestamp_ms=stamp)

    def _read_at(self, topic: str, partition: int, offset: int, key: bytes) -> _Read:
        """Read the first record at or after `offset` with a throwaway consumer (blocking)."""
        consumer = Consumer(
            {
                "bootstrap.servers": self._bootstrap,
                "group.id": "lethe-verify",  # the client wants one; assign() joins no group
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
            }
        )
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

    def _unavailable(self, exc: BaseException) -> LetheError:
        # librdkafka's messages can quote keys: only the error's type and code name leave here.
        code = exc.args[0].name() if exc.args and isinstance(exc.args[0], KafkaError) else ""
        return ServiceUnavailable(
            f"Kafka at {self._bootstrap}: {type(exc).__name__} {code}".strip()
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


erase, verify = connector_activities("kafka", TombstoneWriter.for_connection)
