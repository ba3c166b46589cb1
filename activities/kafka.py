"""The Kafka connector: tombstones the subject's key and works out when earlier records are gone.

A tombstone (a record with the subject's key and no value) tells consumers to drop the key at
once, but the subject's earlier records stay in the log until the log cleaner compacts them or
retention deletes their segment. When that is guaranteed depends on the topic's settings, so
erase records where the tombstone went and `removal_deadline` computes the bound from the
settings; verify reads the tombstone back and compares the bound with the erasure window.

One code path erases a batch of subjects (bulk erasure, `erase_batch`) and a single subject's
step (a job of one): every subject's key rendered, one search of the keys' partitions for the
job's earlier tombstones, every missing tombstone produced and then ONE flush, each delivery
report kept per subject (a failed delivery fails that subject only; a job all of whose
subjects failed for a reason that may clear fails as a whole, so Temporal retries it). Verify
reads the tombstones back with one read per partition and judges the topic's settings once.

Each step writes its tombstones once. A tombstone carries headers naming the request and the
step (`lethe-request`, `lethe-step`), and in a batch the batch and the subject's reference
(`lethe-batch`, `lethe-subject`); no personal data. Erase first looks for them in the keys'
partitions, from the offset of the erasure's start (found by timestamp) or, narrower, from
where an earlier attempt's heartbeat (`offsets`, per partition) says it was about to produce. A
retry after a crash between the delivery and the activity's completion finds the first
tombstones and reports them as its evidence (`tombstone_reused`, `tombstones_reused`) instead of
writing them again. No journal per subject: the headers are the record.

A topic keyed by something else, with the subject in a field of its JSON values
(`value_field`), is read whole, once for the whole batch (`lethe.activities.kafka_scan`); each key
whose latest record is a subject's gets a tombstone on that key's partition, with the same
headers. A retry's scan sees the first attempt's tombstones as those keys' latest records and
reuses them (a batch's by `lethe-subject`). Verify reads the topic again: no key's latest record
may still be a subject's. A topic that cannot be edited per subject (`removal: retention`) gets
nothing written: its steps (`expire`) give the date, once for a batch, by which the topic's
retention has removed every record older than the erasure.

Every read (the search, the read back, the scan) borrows a consumer from the worker's
`Readers` and waits only for a record that can come: it takes what has been fetched, asks for
no more than remain to its last offset, and learns of a partition's end (a compacted gap) within
`END_WAIT_MS`. Verify right after erase, in the same activity, judges the settings erase read
(at most `SETTINGS_REUSE_SECONDS` old); a re-check in a later activity reads them again.

Preflight checks, touching nothing, that the cluster answers, the topic exists, the key or value
template fills from the request, that a topic edited by value is compacted, and (where the
broker reports it) that this worker may write the topic.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, Self, TypeVar, cast

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
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
from lethe.activities.kafka_scan import (
    SUBJECT_HEADER,
    Match,
    Readers,
    ScanResult,
    TopicScan,
    take,
)
from lethe.classification.datamap import KafkaTopicLocator, MissingIdentity, render
from lethe.contracts import (
    BatchStepOutcome,
    BatchStepRequest,
    BulkSubject,
    Evidence,
    StepOutcome,
    StepRequest,
    StepStatus,
    SubjectOutcome,
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
BATCH_HEADER = "lethe-batch"
"""The headers of a tombstone: the request and the step that wrote it, and for a bulk erasure
the batch (and `lethe-subject`, the subject's reference); no personal data."""
CLOCK_SKEW = timedelta(minutes=5)
"""How far before the erasure's start (the Temporal server's clock) the search for an earlier
tombstone begins: the tombstone's timestamp comes from the worker's (or the broker's) clock."""
SEARCH_SLICE_SECONDS = 5.0
"""How long the search for an earlier tombstone reads between two heartbeats."""
SEARCH_BATCH = 500
"""How many records the search takes from the consumer at a time."""
SEARCH_GROUP = "lethe-erase"
VERIFY_GROUP = "lethe-verify"
"""The group ids of the search's and the read back's consumers (assign() joins no group)."""
SETTINGS_REUSE_SECONDS = 2.0
"""How recent erase's reading of the topic's settings must be for the verify that follows it
in the same activity (the same writer) to judge by it instead of asking the broker again."""
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


@dataclass(frozen=True)
class _Stone:
    """One subject's tombstone by key: where it is, or the error that stopped it."""

    delivery: _Delivery | None = None
    reused: bool = False
    """An earlier attempt wrote it (found by its headers); none written now."""
    error: LetheError | None = None


@dataclass(frozen=True)
class _Job:
    """One step for the subjects of a batch: the single step is a job of one subject.

    `marks` are the headers every tombstone of the job carries and a retry looks for: the
    request and the step, and for a batch its number; a batch's tombstones also name their
    subject's reference (`lethe-subject`), so that a retry tells whose a reused one is."""

    request: StepRequest | BatchStepRequest
    subjects: tuple[BulkSubject, ...]
    marks: tuple[tuple[str, bytes], ...]
    batched: bool

    @classmethod
    def of(cls, request: StepRequest | BatchStepRequest) -> _Job:
        """The job of a batch, or of one subject's step."""
        marks = (
            (REQUEST_HEADER, request.request_id.encode()),
            (STEP_HEADER, request.step.id.encode()),
        )
        if isinstance(request, BatchStepRequest):
            batch = (BATCH_HEADER, str(request.batch).encode())
            return cls(request, tuple(request.subjects), (*marks, batch), True)
        one = BulkSubject(subject_ref=request.subject_ref, subject=request.subject)
        return cls(request, (one,), marks, False)

    @property
    def topic(self) -> str:
        """The step's topic."""
        return TombstoneWriter.locator(self.request).topic

    def headers(self, index: int) -> list[tuple[str, bytes]]:
        """The headers of subject `index`'s tombstone."""
        if not self.batched:
            return list(self.marks)
        return [*self.marks, (SUBJECT_HEADER, self.subjects[index].subject_ref.encode())]

    def owner(self, ref: str | None) -> int | None:
        """Whose a reused tombstone is, by the reference it names (the one subject of a job of
        one); None when no subject of the job is named."""
        if not self.batched:
            return 0
        return next((i for i, s in enumerate(self.subjects) if s.subject_ref == ref), None)


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _key_of(locator: KafkaTopicLocator, step_id: str, item: BulkSubject) -> bytes:
    if locator.key_template is None:
        raise ConfigurationError(f"step {step_id!r}: the topic is not keyed by subject")
    values = item.subject.template_values(item.subject_ref)
    return render(locator.key_template, values).encode()


def _key(request: StepRequest) -> tuple[str, bytes]:
    locator = TombstoneWriter.locator(request)
    item = BulkSubject(subject_ref=request.subject_ref, subject=request.subject)
    return locator.topic, _key_of(locator, request.step.id, item)


def _match_of(locator: KafkaTopicLocator, step_id: str, item: BulkSubject) -> Match:
    """How the scan of a topic keyed by something else knows the subject's records."""
    if locator.value_field is None:
        raise ConfigurationError(f"step {step_id!r}: the topic has no value_field")
    values = item.subject.template_values(item.subject_ref)
    return Match(
        value_field=locator.value_field,
        value=render(locator.value_template, values),
        tenant_field=locator.tenant_field,
        tenant=item.subject.tenant,
    )


def _match(request: StepRequest) -> Match:
    item = BulkSubject(subject_ref=request.subject_ref, subject=request.subject)
    return _match_of(TombstoneWriter.locator(request), request.step.id, item)


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


def _search_since(request: StepRequest | BatchStepRequest) -> int:
    """Since when (ms) a tombstone of the step's earlier attempts can be stamped: the erasure's
    start, or the first attempt of this activity if later, less the clock skew allowed."""
    since = _utc(request.erasure_started_at)
    if activity.in_activity():
        since = max(since, _utc(activity.info().scheduled_time))
    return int((since - CLOCK_SKEW).timestamp() * 1000)


def _first_attempt() -> bool:
    """Whether this is an activity's first attempt (outside an activity, called directly, no
    one can say: not)."""
    return activity.in_activity() and activity.info().attempt == 1


def _heartbeat(topic: str, offsets: Mapping[int, int]) -> None:
    """Tell a later attempt where to look: the step's tombstones, if any, are at or after
    `offsets` (per partition; nothing of them is earlier). Outside an activity, nothing."""
    heartbeat({"topic": topic, "offsets": {str(p): o for p, o in sorted(offsets.items())}})


def _earlier_offsets(topic: str) -> dict[int, int]:
    """Where an earlier attempt's last heartbeat says the step's tombstones can start, per
    partition, if it left that for this topic (heartbeats are best-effort: often there is none)."""
    if not activity.in_activity():
        return {}
    details = activity.info().heartbeat_details
    last = details[-1] if details else None
    if not isinstance(last, dict) or last.get("topic") != topic:
        return {}
    offsets = last.get("offsets")
    if not isinstance(offsets, dict):
        return {}
    found: dict[int, int] = {}
    for partition, offset in offsets.items():
        if str(partition).isdigit() and type(offset) is int and offset >= 0:
            found[int(partition)] = offset
    return found


class _Search:
    """Reads partitions from starting offsets up to their ends when the search began, looking
    for the tombstones of one job (its headers) for the keys wanted in each (blocking: runs in
    a thread). It compares keys, headers and whether a value is there; values are never kept
    or shown. A partition's read stops once all its keys are found."""

    def __init__(
        self,
        readers: Readers,
        topic: str,
        wanted: Mapping[int, Collection[bytes]],
        marks: Sequence[tuple[str, bytes]],
    ) -> None:
        self._readers, self._bootstrap, self._topic = readers, readers.bootstrap, topic
        self._wanted = {partition: set(keys) for partition, keys in wanted.items()}
        """Per partition, the keys whose tombstone is not found yet."""
        self._marks = list(marks)
        self._consumer = readers.borrow(SEARCH_GROUP)
        self._started = False
        self._open: set[int] = set()
        self.nexts: dict[int, int] = {}
        """Per partition, the first offset not read yet."""
        self.ends: dict[int, int] = {}
        """Per partition, its high watermark when the search began: where it stops."""
        self.found: dict[bytes, _Delivery] = {}

    @property
    def finished(self) -> bool:
        """Every partition is read to its end, or all its keys are found."""
        return not self._open

    def start(self, since_ms: int, earlier: Mapping[int, int]) -> None:
        """Bound the search: each partition from `earlier` (an earlier attempt's heartbeat)
        when it fits the partition, else from the first record stamped at or after `since_ms`."""
        self._started = True
        for partition in sorted(self._wanted):
            place = TopicPartition(self._topic, partition)
            low, high = self._consumer.get_watermark_offsets(place, timeout=TIMEOUT_SECONDS)
            begin = earlier.get(partition)
            if begin is None or begin > high:  # none, or from before the topic was recreated
                [stamped] = self._consumer.offsets_for_times(
                    [TopicPartition(self._topic, partition, since_ms)], timeout=TIMEOUT_SECONDS
                )
                if stamped.error is not None:
                    raise KafkaException(stamped.error)
                begin = stamped.offset if stamped.offset >= 0 else high
            self.nexts[partition], self.ends[partition] = max(begin, low), high
            if self.nexts[partition] < high:
                self._open.add(partition)
        if self._open:
            self._consumer.assign(
                [TopicPartition(self._topic, p, self.nexts[p]) for p in sorted(self._open)]
            )

    def read(self, seconds: float) -> None:
        """Read on for up to `seconds`, or to the end."""
        now = time.monotonic()
        stop, idle_until = now + seconds, now + TIMEOUT_SECONDS
        last_error = ""
        while not self.finished and time.monotonic() < stop:
            # No more than are left, so the last batch need not wait out the timeout to fill.
            left = sum(self.ends[p] - self.nexts[p] for p in self._open)
            messages = take(self._consumer, max(1, min(SEARCH_BATCH, left)))
            if not messages:
                if time.monotonic() > idle_until:
                    raise ServiceUnavailable(
                        f"Kafka at {self._bootstrap}: no record read in time while looking for "
                        f"an earlier tombstone {last_error}".strip()
                    )
                continue
            idle_until = time.monotonic() + TIMEOUT_SECONDS
            for message in messages:
                last_error = self._take(message) or last_error

    def _take(self, message: Message) -> str:
        partition, offset = message.partition(), message.offset()
        if partition not in self._open or offset is None:
            return ""
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                self._close(partition)  # compaction left a gap up to the end
                return ""
            return str(error.name())
        if offset >= self.ends[partition]:
            self._close(partition)
            return ""
        self.nexts[partition] = offset + 1
        key = message.key()
        missing = self._wanted[partition]  # the keys of the partition not found yet
        if key in missing and self._ours(message):
            kind, stamp = message.timestamp()
            if kind == TIMESTAMP_NOT_AVAILABLE:
                stamp = int(time.time() * 1000)
            self.found[key] = _Delivery(partition=partition, offset=offset, timestamp_ms=stamp)
            missing.discard(key)
        if self.nexts[partition] >= self.ends[partition] or not missing:
            self._close(partition)
        return ""

    def _ours(self, message: Message) -> bool:
        if message.value() is not None:
            return False
        headers = message.headers() or []
        pairs = list(headers.items()) if isinstance(headers, dict) else headers
        return all(mark in pairs for mark in self._marks)

    def _close(self, partition: int) -> None:
        self._open.discard(partition)
        if self._open:
            self._consumer.incremental_unassign([TopicPartition(self._topic, partition)])

    def searched_to(self) -> dict[int, int]:
        """Per partition, where a later search must start: nothing of the job's is before it,
        and the tombstones found (which a retry must find again) are not skipped."""
        return {
            partition: min(
                [begin, *(d.offset for d in self.found.values() if d.partition == partition)]
            )
            for partition, begin in self.nexts.items()
        }

    def close(self) -> None:
        """Give the consumer back: kept if the search ended, else closed."""
        self._readers.give_back(SEARCH_GROUP, self._consumer, clean=self._started and self.finished)


class _TombstoneSearch:
    """The search for one key's tombstone in one partition (`_Search`, a job of one key)."""

    def __init__(
        self,
        readers: Readers,
        topic: str,
        partition: int,
        key: bytes,
        marks: Sequence[tuple[str, bytes]],
    ) -> None:
        self._partition, self._key = partition, key
        self._search = _Search(readers, topic, {partition: [key]}, marks)

    @property
    def next(self) -> int:
        """The first offset not read yet."""
        return self._search.nexts[self._partition]

    @property
    def end(self) -> int:
        """The partition's high watermark when the search began."""
        return self._search.ends[self._partition]

    @property
    def finished(self) -> bool:
        """Read to the end, or found."""
        return self._search.finished

    def start(self, since_ms: int, earlier: int | None) -> None:
        """Bound the search (`_Search.start`)."""
        self._search.start(since_ms, {} if earlier is None else {self._partition: earlier})

    def read(self, seconds: float) -> _Delivery | None:
        """Read on for up to `seconds`: the tombstone if found, else None."""
        self._search.read(seconds)
        return self._search.found.get(self._key)

    def close(self) -> None:
        """Give the consumer back (`_Search.close`)."""
        self._search.close()


class _ReadBack:
    """Reads one partition from the first of some offsets to the last (blocking), telling for
    each offset whether the job's tombstone for its key is there, or gone from the log."""

    def __init__(self, readers: Readers, topic: str, partition: int) -> None:
        self._readers, self._topic, self._partition = readers, topic, partition
        self._bootstrap = readers.bootstrap

    def read(self, wanted: Mapping[int, bytes]) -> dict[int, _Read]:
        """Per offset in `wanted` (offset -> key), what the log holds there now."""
        with self._readers.lent(VERIFY_GROUP) as consumer:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(self._topic, self._partition), timeout=TIMEOUT_SECONDS
            )
            reads: dict[int, _Read] = {}
            for offset in wanted:
                if offset < low:
                    reads[offset] = _Read(low=low, high=high, offset=low)
                elif offset >= high:
                    reads[offset] = _Read(low=low, high=high, offset=None)
            inside = sorted(offset for offset in wanted if offset not in reads)
            if inside:
                self._follow(consumer, inside, wanted, reads, (low, high))
            return reads

    def _follow(
        self,
        consumer: Consumer,
        offsets: Sequence[int],
        wanted: Mapping[int, bytes],
        reads: dict[int, _Read],
        marks: tuple[int, int],
    ) -> None:
        low, high = marks
        consumer.assign([TopicPartition(self._topic, self._partition, offsets[0])])
        pending = list(offsets)
        deadline = time.monotonic() + TIMEOUT_SECONDS
        position = offsets[0]
        while pending:
            if time.monotonic() > deadline:
                raise ServiceUnavailable(f"Kafka at {self._bootstrap}: no record read in time")
            # No more than are left to the last wanted offset (fewer if compaction left gaps).
            left = max(1, min(SEARCH_BATCH, pending[-1] - position + 1))
            for message in take(consumer, left):
                error, at = message.error(), message.offset()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:  # a compacted gap to the end
                        reads.update({o: _Read(low=low, high=high, offset=high) for o in pending})
                        pending = []
                    continue
                if at is None:
                    continue
                deadline, position = time.monotonic() + TIMEOUT_SECONDS, at + 1
                while pending and pending[0] <= at:
                    offset = pending.pop(0)
                    here = offset == at
                    reads[offset] = _Read(
                        low=low,
                        high=high,
                        offset=at,
                        key_matches=here and message.key() == wanted[offset],
                        is_tombstone=here and message.value() is None,
                    )
                if not pending:
                    break


@dataclass
class _ByValue:
    """What the tombstoning of a topic keyed by something else did, per subject and in all."""

    topic: str
    settings: dict[str, str]
    stones: list[tuple[int, int, int]] = field(default_factory=list)
    """(partition, offset, timestamp ms) of every tombstone of the job, written or reused."""
    written: list[int] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)
    superseded: list[int] = field(default_factory=list)
    """Per subject: keys tombstoned now, tombstones of an earlier attempt, keys no longer theirs."""
    errors: dict[int, LetheError] = field(default_factory=dict)
    unattributed: int = 0
    """Tombstones of an earlier attempt naming no subject of the batch."""
    records: int = 0
    unreadable: int = 0

    @property
    def last_ms(self) -> int:
        """When the last tombstone was written (now if none was)."""
        return max((stamp for _, _, stamp in self.stones), default=int(time.time() * 1000))

    def evidence(self) -> Evidence:
        """Counts for the whole job, and where its tombstones are (partition, offset)."""
        return {
            "topic": self.topic,
            "tombstones": json.dumps([[p, o] for p, o, _ in sorted(self.stones)]),
            "tombstone_time_ms": self.last_ms,
            "keys_tombstoned": sum(self.written),
            "keys_reused": sum(self.reused) + self.unattributed,
            "keys_superseded": sum(self.superseded),
            "records_read": self.records,
            "records_unreadable": self.unreadable,
            **_settings_evidence(self.settings),
        }


def _found_detail(written: int, reused: int, superseded: int) -> str:
    return (
        f"{written} tombstone(s) written, {reused} of an earlier attempt found, "
        f"{superseded} key(s) no longer the subject's"
    )


def _failed(ref: str, error: LetheError) -> SubjectOutcome:
    """A subject the batch could not erase: the error's type and text (which name no key)."""
    return SubjectOutcome(
        subject_ref=ref, status="failed", detail=f"{type(error).__name__}: {error}"
    )


def _raise_if_all_failed(errors: Sequence[LetheError | None]) -> None:
    """A job whose every subject failed for a reason that may clear fails as a whole (Temporal
    retries it) rather than failing each subject for good."""
    if errors and all(error is not None and error.retryable for error in errors):
        raise cast(LetheError, errors[0])


class TombstoneWriter(Connector[KafkaTopicLocator]):
    """Tombstones the subject's records in a compacted topic, or dates their expiry."""

    kind = "kafka"
    locator_model = KafkaTopicLocator
    actions = ("tombstone", "expire")
    batching = (
        "every tombstone of the batch produced, then one flush; read back once per partition; "
        "the topic's settings judged once"
    )
    checks = (
        "the cluster answers; the topic exists; the key or value template fills; what the "
        "broker lets this worker do (write, read, describe configs); compaction for value_field"
    )
    proves = (
        "the tombstone is the key's latest record, and the topic's compaction or retention "
        "settings remove what it shadows by the end of the window (else pending_compaction or "
        "at_risk, never done)"
    )
    retries = (
        "the tombstones found again by their lethe-request, lethe-step (and lethe-batch) headers"
    )
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
        self._readers = clients.kafka_readers(bootstrap)
        self._kept: dict[str, tuple[float, dict[str, str]]] = {}
        """Per topic, erase's reading of its settings (when, what), for the verify after it."""

    @classmethod
    def open(cls, clients: Clients, connection: str) -> Self:
        """A writer for the cluster whose bootstrap servers are `connection`."""
        return cls(clients, connection)

    # --- one subject: a job of one ---------------------------------------------------------

    async def erase(self, request: StepRequest) -> StepOutcome:
        """Write a tombstone for the subject's key; `running` until verify sees removal is due."""
        locator = self.locator(request)
        if locator.removal == "retention":
            return await self._expire(request)
        if locator.value_field is not None:
            return await self._erase_by_value(request)
        topic, settings, [stone] = await self._tombstone_keys(_Job.of(request))
        if stone.error is not None:
            raise stone.error
        delivery = stone.delivery
        assert delivery is not None
        what = (
            "tombstone of an earlier attempt found, none written"
            if stone.reused
            else "tombstone written"
        )
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
                "tombstone_reused": stone.reused,
                **_settings_evidence(settings),
            },
            detail=f"{what}; {removal.reason}",
            gone_by=removal.gone_by,
        )

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
        settings = await self._settings(request, topic, recent=True)
        [read] = await self._read_back(topic, [(partition, offset, key)])
        evidence: Evidence = {
            **erased.evidence,
            **_settings_evidence(settings),
            "low_watermark": read.low,
            "high_watermark": read.high,
        }
        if not _still_there(read, offset):
            return verdict(erased, evidence, [_not_the_tombstone(partition, offset)])
        # A tombstone no longer in the log was itself removed by compaction or retention: fine.
        evidence["tombstone_present"] = read.offset == offset
        return await self._judged(request, erased, evidence, settings, tombstone_ms, [partition])

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

    async def sweep(self, batch: SweepBatch) -> SweepResult:
        """The task's topic settings against its retention rules: drift reported and, with
        `apply`, changed (`lethe.activities.kafka_retention`)."""
        return await TopicRetention(self._admin, self._bootstrap, TIMEOUT_SECONDS).sweep(batch)

    # --- a batch of subjects ---------------------------------------------------------------

    async def erase_batch(self, batch: BatchStepRequest) -> BatchStepOutcome:
        """Tombstone every subject's key (or, by value, every key whose latest record is one of
        theirs, found in one read of the topic) with one flush, then verify: one outcome per
        subject. `expire` writes nothing and dates the topic's retention once for the batch."""
        locator = self.locator(batch)
        if locator.removal == "retention":
            erased = await self._expire_batch(batch)
        elif locator.value_field is not None:
            erased = await self._erase_batch_by_value(batch)
        else:
            erased = await self._erase_batch_by_key(batch)
        verified = await self.verify_batch(batch, erased)
        # Verify's evidence keeps erase's: the certificate has what erasing did and found.
        detail = "; ".join(d for d in (erased.detail, verified.detail) if d)
        return verified.model_copy(update={"detail": detail})

    async def verify_batch(
        self, batch: BatchStepRequest, erased: BatchStepOutcome
    ) -> BatchStepOutcome:
        """Read the batch's tombstones back (per partition) or the topic again (by value), and
        judge the topic's settings once for the batch; subjects that failed stay failed."""
        locator = self.locator(batch)
        if locator.removal == "retention":
            return await self._verify_expiry_batch(batch, erased)
        if locator.value_field is not None:
            return await self._verify_batch_by_value(batch, erased)
        return await self._verify_batch_by_key(batch, erased)

    async def _erase_batch_by_key(self, batch: BatchStepRequest) -> BatchStepOutcome:
        topic, settings, stones = await self._tombstone_keys(_Job.of(batch))
        _raise_if_all_failed([stone.error for stone in stones])
        outcomes: list[SubjectOutcome] = []
        where: list[list[int] | None] = []
        for item, stone in zip(batch.subjects, stones, strict=True):
            delivery = stone.delivery
            if stone.error is not None or delivery is None:
                outcomes.append(_failed(item.subject_ref, stone.error or _lost()))
                where.append(None)
                continue
            what = "tombstone of an earlier attempt found" if stone.reused else "tombstone written"
            outcomes.append(
                SubjectOutcome(
                    subject_ref=item.subject_ref, status="running", affected=1, detail=what
                )
            )
            where.append([delivery.partition, delivery.offset, delivery.timestamp_ms])
        stamps = [place[2] for place in where if place is not None]
        last_ms = max(stamps, default=int(time.time() * 1000))
        removal = removal_deadline(settings, _from_ms(last_ms))
        reused = sum(1 for stone in stones if stone.reused)
        return BatchStepOutcome(
            step_id=batch.step.id,
            outcomes=outcomes,
            evidence={
                "topic": topic,
                "tombstones": json.dumps(where),
                "tombstone_time_ms": last_ms,
                "tombstones_written": len(stamps) - reused,
                "tombstones_reused": reused,
                "subjects_failed": len(stones) - len(stamps),
                **_settings_evidence(settings),
            },
            detail=(
                f"{len(stamps) - reused} tombstone(s) written, {reused} of an earlier attempt "
                f"found, {len(stones) - len(stamps)} subject(s) failed; {removal.reason}"
            ),
            gone_by=removal.gone_by if stamps else None,
        )

    async def _verify_batch_by_key(
        self, batch: BatchStepRequest, erased: BatchStepOutcome
    ) -> BatchStepOutcome:
        topic = self.locator(batch).topic
        recorded = erased.evidence.get("tombstones")
        places = json.loads(recorded) if isinstance(recorded, str) else None
        if not isinstance(places, list) or len(places) != len(batch.subjects):
            return _all_failed(batch, erased, "the erase outcome records no tombstones")
        settings = await self._settings(batch, topic, recent=True)
        locator = self.locator(batch)
        checks: list[tuple[int, int, bytes]] = []
        indices: list[int] = []
        for index, (item, place) in enumerate(zip(batch.subjects, places, strict=True)):
            if place is not None and erased.outcomes[index].status != "failed":
                checks.append((int(place[0]), int(place[1]), _key_of(locator, batch.step.id, item)))
                indices.append(index)
        reads = await self._read_back(topic, checks)
        outcomes = list(erased.outcomes)
        present = missing = 0
        partitions: set[int] = set()
        for index, (partition, offset, _), read in zip(indices, checks, reads, strict=True):
            if not _still_there(read, offset):
                missing += 1
                outcomes[index] = outcomes[index].model_copy(
                    update={"status": "failed", "detail": _not_the_tombstone(partition, offset)}
                )
                continue
            present += read.offset == offset
            partitions.add(partition)
        evidence: Evidence = {
            **erased.evidence,
            **_settings_evidence(settings),
            "tombstones_present": present,
            "tombstones_not_found": missing,
        }
        last_ms = max((int(places[i][2]) for i in indices), default=0)
        judged = {i for i in indices if outcomes[i].status != "failed"}
        return await self._judged_batch(
            batch, outcomes, judged, evidence, settings, last_ms, sorted(partitions)
        )

    async def _judged_batch(
        self,
        batch: BatchStepRequest,
        outcomes: list[SubjectOutcome],
        judged: Collection[int],
        evidence: Evidence,
        settings: Mapping[str, str],
        tombstone_ms: int,
        partitions: Sequence[int],
    ) -> BatchStepOutcome:
        """The verified batch: the subjects `judged` (by index) get the status the settings
        give the batch's last tombstone, worked out once for the batch; the others keep theirs."""
        status: StepStatus = "done"
        gone_by, detail = None, ""
        if judged:
            status, gone_by, detail = await self._judgement(
                batch, evidence, settings, tombstone_ms, partitions
            )
        return BatchStepOutcome(
            step_id=batch.step.id,
            outcomes=[
                o.model_copy(update={"status": status}) if i in judged else o
                for i, o in enumerate(outcomes)
            ],
            evidence=evidence,
            detail=detail,
            gone_by=gone_by,
        )

    async def _expire_batch(self, batch: BatchStepRequest) -> BatchStepOutcome:
        """Nothing written: the topic's retention date, worked out once for the batch."""
        erased = await self._expire(batch)
        return BatchStepOutcome(
            step_id=batch.step.id,
            outcomes=[
                SubjectOutcome(subject_ref=item.subject_ref, status="running")
                for item in batch.subjects
            ],
            evidence=erased.evidence,
            detail=erased.detail,
            gone_by=erased.gone_by,
        )

    async def _verify_expiry_batch(
        self, batch: BatchStepRequest, erased: BatchStepOutcome
    ) -> BatchStepOutcome:
        status, gone_by, evidence, detail = await self._expiry_status(batch)
        return BatchStepOutcome(
            step_id=batch.step.id,
            outcomes=[
                o.model_copy(update={"status": status}) if o.status != "failed" else o
                for o in erased.outcomes
            ],
            evidence={**erased.evidence, **evidence},
            detail=detail,
            gone_by=gone_by,
        )

    async def _erase_batch_by_value(self, batch: BatchStepRequest) -> BatchStepOutcome:
        job = _Job.of(batch)
        done = await self._tombstone_values(job)
        _raise_if_all_failed([done.errors.get(i) for i in range(len(job.subjects))])
        outcomes = []
        for index, item in enumerate(batch.subjects):
            error = done.errors.get(index)
            if error is not None:
                outcomes.append(_failed(item.subject_ref, error))
                continue
            written, reused = done.written[index], done.reused[index]
            superseded = done.superseded[index]
            found = written or reused or superseded
            outcomes.append(
                SubjectOutcome(
                    subject_ref=item.subject_ref,
                    status="running",
                    affected=written + reused,
                    detail=_found_detail(written, reused, superseded)
                    if found
                    else "no record of the subject in the topic",
                )
            )
        removal = removal_deadline(done.settings, _from_ms(done.last_ms))
        superseded_at = [i for i, n in enumerate(done.superseded) if n]
        return BatchStepOutcome(
            step_id=batch.step.id,
            outcomes=outcomes,
            evidence={
                **done.evidence(),
                "superseded_at": json.dumps(superseded_at),
                "subjects_failed": len(done.errors),
            },
            detail=(
                f"{_found_detail(sum(done.written), sum(done.reused), sum(done.superseded))}; "
                f"{removal.reason}"
            ),
            gone_by=removal.gone_by if done.stones or superseded_at else None,
        )

    async def _verify_batch_by_value(
        self, batch: BatchStepRequest, erased: BatchStepOutcome
    ) -> BatchStepOutcome:
        job = _Job.of(batch)
        topic = job.topic
        settings = await self._settings(batch, topic, recent=True)
        matches, errors = _matches(job)
        scan = await self._scan(job, topic, matches)
        still: dict[int, int] = {}
        for latest in scan.still_the_subjects():
            for index in latest.whose:
                still[matches[index][0]] = still.get(matches[index][0], 0) + 1
        recorded = erased.evidence.get("superseded_at")
        superseded = set(json.loads(recorded)) if isinstance(recorded, str) else set()
        outcomes, judged = list(erased.outcomes), set()
        for index, outcome in enumerate(outcomes):
            if outcome.status == "failed" or index in errors:
                continue
            if still.get(index):
                outcomes[index] = outcome.model_copy(
                    update={"status": "failed", "detail": _still_detail(still[index], topic)}
                )
            elif scan.unreadable:
                outcomes[index] = outcome.model_copy(
                    update={
                        "status": "at_risk",
                        "detail": _unreadable_detail(scan.unreadable, topic),
                    }
                )
            elif outcome.affected or index in superseded:
                judged.add(index)
            else:
                outcomes[index] = outcome.model_copy(update={"status": "done"})
        evidence: Evidence = {
            **erased.evidence,
            **_settings_evidence(settings),
            "keys_still_the_subjects": sum(still.values()),
            "records_unreadable": scan.unreadable,
        }
        tombstone_ms = erased.evidence.get("tombstone_time_ms")
        stones = erased.evidence.get("tombstones")
        partitions = (
            sorted({int(pair[0]) for pair in json.loads(stones)}) if isinstance(stones, str) else []
        )
        last_ms = tombstone_ms if isinstance(tombstone_ms, int) else int(time.time() * 1000)
        return await self._judged_batch(
            batch, outcomes, judged, evidence, settings, last_ms, partitions
        )

    # --- the work of a job (one subject's step, or a batch's) ------------------------------

    async def _tombstone_keys(self, job: _Job) -> tuple[str, dict[str, str], list[_Stone]]:
        """Each subject's key tombstoned (or the tombstone of an earlier attempt found): one
        search of the keys' partitions for the job's earlier tombstones, then every missing
        tombstone produced with one flush. The topic, its settings, and a stone per subject."""
        locator = self.locator(job.request)
        topic = locator.topic
        # Reading the settings first also proves the topic exists, so a wrong name in the data
        # map cannot make the broker auto-create a topic when the tombstones are produced.
        settings = await self._settings(job.request, topic, keep=True)
        count = await self._partition_count(job.request, topic)
        keys: list[bytes | LetheError] = []
        for item in job.subjects:
            try:
                keys.append(_key_of(locator, job.request.step.id, item))
            except MissingIdentity as exc:  # it names the placeholder, not a value
                keys.append(exc)
        # Each tombstone goes to the partition a Java producer puts the key on, named explicitly
        # so that it is the partition searched (and heartbeated) whatever the producer's
        # metadata says.
        owners: dict[bytes, int] = {}
        for index, key in enumerate(keys):
            if isinstance(key, bytes):
                owners.setdefault(key, index)
        wanted: dict[int, set[bytes]] = {}
        for key in owners:
            wanted.setdefault(partition_of(key, count), set()).add(key)
        found = await self._earlier_tombstones(job, topic, wanted)
        fresh = [
            (key, partition_of(key, count), job.headers(owners[key]))
            for key in owners
            if key not in found
        ]
        delivered = await asyncio.to_thread(self._produce_tombstone, topic, fresh) if fresh else {}
        stones = []
        for key in keys:
            if not isinstance(key, bytes):
                stones.append(_Stone(error=key))
            elif key in found:
                stones.append(_Stone(delivery=found[key], reused=True))
            else:
                landed = delivered[key]
                stones.append(
                    _Stone(delivery=landed)
                    if isinstance(landed, _Delivery)
                    else _Stone(error=landed)
                )
        return topic, settings, stones

    async def _earlier_tombstones(
        self, job: _Job, topic: str, wanted: Mapping[int, Collection[bytes]]
    ) -> dict[bytes, _Delivery]:
        """The job's tombstones of the `wanted` keys (per partition) an earlier attempt wrote;
        then heartbeats where a later attempt must look from (a crash after the tombstones
        leaves that for the retry).

        The search starts where an earlier attempt's heartbeat says it was about to produce,
        else at the first record stamped after the erasure began, or after the activity's first
        attempt was scheduled if later (less the clock skew allowed): a bulk request's later
        batches do not read the traffic since the request began; a batch's first attempt reads
        nothing. It ends at each partition's
        end when it began, and heartbeats as it reads.
        """
        since_ms = _search_since(job.request)
        if job.batched and _first_attempt():
            # A bulk batch's activity id is its own: before its first attempt nothing can have
            # written its tombstones, so the search only notes where the partitions end.
            since_ms = int(time.time() * 1000)
        earlier = _earlier_offsets(topic)
        search = await self._in_thread(_Search, self._readers, topic, wanted, job.marks)
        try:
            await self._in_thread(search.start, since_ms, earlier)
            while not search.finished:
                await self._in_thread(search.read, SEARCH_SLICE_SECONDS)
                if not search.finished:
                    _heartbeat(topic, search.searched_to())
            _heartbeat(topic, search.searched_to())
            return search.found
        finally:
            await asyncio.to_thread(search.close)

    async def _read_back(
        self, topic: str, tombstones: Sequence[tuple[int, int, bytes]]
    ) -> list[_Read]:
        """What the log holds at each (partition, offset) a tombstone of `key` was written to:
        one read per partition, from its first tombstone to its last, the partitions at once."""
        by_partition: dict[int, dict[int, bytes]] = {}
        for partition, offset, key in tombstones:
            by_partition.setdefault(partition, {})[offset] = key
        partitions = sorted(by_partition)
        reads = await asyncio.gather(
            *(
                self._in_thread(_ReadBack(self._readers, topic, p).read, by_partition[p])
                for p in partitions
            )
        )
        found = dict(zip(partitions, reads, strict=True))
        return [found[partition][offset] for partition, offset, _ in tombstones]

    async def _judgement(
        self,
        request: StepRequest | BatchStepRequest,
        evidence: Evidence,
        settings: Mapping[str, str],
        tombstone_ms: int,
        partitions: Sequence[int],
    ) -> tuple[StepStatus, datetime | None, str]:
        """The status when the settings remove what the tombstones (the last at
        `tombstone_ms`, in `partitions`) cover, against the erasure window; with when, and why.
        Whether each partition's tombstone segment has rolled goes into `evidence`."""
        removal = removal_deadline(settings, _from_ms(tombstone_ms))
        now = datetime.now(UTC)
        rolled_at: datetime | None = None
        if removal.by_compaction and removal.gone_by is not None and removal.gone_by <= now:
            due_ms = tombstone_ms + _setting(settings, "segment.ms")
            topic = TombstoneWriter.locator(request).topic
            rolled_at = await self._all_rolled(topic, partitions, due_ms)
            evidence["segment_rolled"] = rolled_at is not None
        return removal_status(removal, _utc(request.window_ends_at), now, rolled_at)

    async def _judged(
        self,
        request: StepRequest,
        erased: StepOutcome,
        evidence: Evidence,
        settings: Mapping[str, str],
        tombstone_ms: int,
        partitions: Sequence[int],
    ) -> StepOutcome:
        """The verified step's status (`_judgement`)."""
        status, gone_by, detail = await self._judgement(
            request, evidence, settings, tombstone_ms, partitions
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
        moments = await asyncio.gather(
            *(self._first_record_since(topic, p, due_ms) for p in partitions)
        )
        if not moments or any(moment is None for moment in moments):
            return None
        return max(moment for moment in moments if moment is not None)

    async def _expiry_status(
        self, request: StepRequest | BatchStepRequest
    ) -> tuple[StepStatus, datetime | None, Evidence, str]:
        """The topic's settings now (they may have changed) against the erasure window."""
        topic = TombstoneWriter.locator(request).topic
        settings = await self._settings(request, topic, recent=True)
        removal = _expiry(settings, _utc(request.erasure_started_at))
        status, gone_by, detail = removal_status(
            removal, _utc(request.window_ends_at), datetime.now(UTC)
        )
        return (
            status,
            gone_by,
            _settings_evidence(settings),
            f"removal by the topic's retention: {detail}",
        )

    async def _expire(self, request: StepRequest | BatchStepRequest) -> StepOutcome:
        """Nothing written: when the topic's retention has removed what predates the erasure."""
        topic = TombstoneWriter.locator(request).topic
        settings = await self._settings(request, topic, keep=True)
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
        status, gone_by, evidence, detail = await self._expiry_status(request)
        return StepOutcome(
            step_id=request.step.id,
            status=status,
            verified=True,
            evidence={**erased.evidence, **evidence},
            detail=detail,
            gone_by=gone_by,
        )

    async def _tombstone_values(self, job: _Job) -> _ByValue:
        """A tombstone for each key whose latest record is one of the job's subjects' (one read
        of the whole topic for the job), with one flush; a tombstone of an earlier attempt
        (the key's latest record, with the job's headers) is reused."""
        topic = job.topic
        settings = await self._settings(job.request, topic, keep=True)
        if "compact" not in _policies(settings):
            where = f"Kafka topic {topic!r} of system {job.request.step.system!r}"
            raise SchemaMismatch(_not_compacted(where, settings))
        matches, errors = _matches(job)
        scan = await self._scan(job, topic, matches)
        size = len(job.subjects)
        done = _ByValue(topic, settings, written=[0] * size, reused=[0] * size, errors=errors)
        done.records, done.unreadable = scan.records, scan.unreadable
        targets = sorted(scan.to_tombstone().items(), key=lambda item: item[1].offset)
        # On the partition of the key's records, wherever a producer's partitioner put them.
        fresh = [
            (key, latest.partition, job.headers(matches[min(latest.whose)][0]))
            for key, latest in targets
        ]
        delivered = await asyncio.to_thread(self._produce_tombstone, topic, fresh) if fresh else {}
        for key, latest in targets:
            landed = delivered[key]
            for index in {matches[i][0] for i in latest.whose}:
                if isinstance(landed, _Delivery):
                    done.written[index] += 1
                else:
                    done.errors.setdefault(index, landed)
            if isinstance(landed, _Delivery):
                done.stones.append((landed.partition, landed.offset, landed.timestamp_ms))
        for latest in scan.tombstoned_before():
            owner = job.owner(latest.owner)
            if owner is None:
                done.unattributed += 1
            else:
                done.reused[owner] += 1
            done.stones.append((latest.partition, latest.offset, latest.timestamp_ms))
        superseded = scan.superseded()
        done.superseded = [0] * size
        for i, n in superseded.items():
            done.superseded[matches[i][0]] += n
        return done

    async def _erase_by_value(self, request: StepRequest) -> StepOutcome:
        """A tombstone for each key whose latest record is the subject's (read from the topic)."""
        done = await self._tombstone_values(_Job.of(request))
        if done.errors:
            raise done.errors[0]
        removal = removal_deadline(done.settings, _from_ms(done.last_ms))
        written, reused, superseded = done.written[0], done.reused[0], done.superseded[0]
        found = bool(done.stones) or superseded > 0
        return StepOutcome(
            step_id=request.step.id,
            status="running",
            affected=len(done.stones),
            evidence=done.evidence(),
            detail=(
                f"{_found_detail(written, reused, superseded)}; {removal.reason}"
                if found
                else "no record of the subject in the topic"
            ),
            gone_by=removal.gone_by if found else None,
        )

    async def _verify_by_value(self, request: StepRequest, erased: StepOutcome) -> StepOutcome:
        """Read the topic again: no key's latest record is the subject's; then the deadline."""
        job = _Job.of(request)
        topic = job.topic
        settings = await self._settings(request, topic, recent=True)
        matches, errors = _matches(job)
        if errors:
            raise errors[0]
        scan = await self._scan(job, topic, matches)
        still = scan.still_the_subjects()
        evidence: Evidence = {
            **erased.evidence,
            **_settings_evidence(settings),
            "keys_still_the_subjects": len(still),
            "records_unreadable": scan.unreadable,
        }
        if still:
            return verdict(erased, evidence, [_still_detail(len(still), topic)])
        if scan.unreadable:
            return StepOutcome(
                step_id=erased.step_id,
                status="at_risk",
                affected=erased.affected,
                verified=True,
                evidence=evidence,
                detail=_unreadable_detail(scan.unreadable, topic),
            )
        if not erased.affected and not erased.evidence.get("keys_superseded"):
            return verdict(erased, evidence, [], "no record of the subject in the topic")
        tombstone_ms = erased.evidence.get("tombstone_time_ms")
        recorded = erased.evidence.get("tombstones")
        if not (isinstance(tombstone_ms, int) and isinstance(recorded, str)):
            return verdict(erased, evidence, ["the erase outcome records no tombstones"])
        partitions = sorted({int(pair[0]) for pair in json.loads(recorded)})
        return await self._judged(request, erased, evidence, settings, tombstone_ms, partitions)

    async def _scan(
        self, job: _Job, topic: str, matches: Sequence[tuple[int, Match]]
    ) -> ScanResult:
        """The whole topic read once for the job's subjects' records (`matches`: the subject's
        index and how its records are known), heartbeating between slices."""
        count = await self._partition_count(job.request, topic)
        scan = await self._in_thread(
            TopicScan,
            self._readers,
            topic,
            count,
            [match for _, match in matches],
            job.marks,
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

    async def _settings(
        self,
        request: StepRequest | BatchStepRequest,
        topic: str,
        *,
        keep: bool = False,
        recent: bool = False,
    ) -> dict[str, str]:
        """The topic's settings and the broker's, or SchemaMismatch if the topic is missing.

        Erase reads them with `keep`; the verify that follows it in the same activity (a writer
        is made per activity) asks with `recent` and takes that reading, once, if it is at most
        SETTINGS_REUSE_SECONDS old, instead of describing the topic again. A re-check in a
        later activity, or a reading too old, asks the broker."""
        kept = self._kept.pop(topic, None) if recent else None
        if kept is not None and time.monotonic() - kept[0] <= SETTINGS_REUSE_SECONDS:
            return dict(kept[1])
        try:
            entries = await self._described(ConfigResource(ResourceType.TOPIC, topic))
        except KafkaException as exc:
            raise self._topic_error(request, topic, exc) from None
        settings = {name: entries[name] for name in TOPIC_SETTINGS if name in entries}
        settings = {**await self._broker_settings(), **settings}
        if keep:
            self._kept[topic] = (time.monotonic(), dict(settings))
        return settings

    async def _partition_count(self, request: StepRequest | BatchStepRequest, topic: str) -> int:
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
        self, topic: str, tombstones: Sequence[tuple[bytes, int, Sequence[tuple[str, bytes]]]]
    ) -> dict[bytes, _Delivery | LetheError]:
        """Produce every tombstone (key, partition, headers), then flush once (blocking: runs
        in a thread); per key, where it landed once the broker acknowledged it, or why not
        (the error's name only). A batch of one is the single step's tombstone."""
        reports: dict[bytes, tuple[KafkaError | None, Message]] = {}
        all_reported = threading.Event()

        def on_delivery(error: KafkaError | None, message: Message) -> None:
            key = message.key()
            if key is not None:
                reports[key] = (error, message)
            if len(reports) >= len(tombstones):
                all_reported.set()

        for key, partition, headers in tombstones:
            self._produce_one(topic, key, partition, headers, on_delivery)
        self._producer.flush(TIMEOUT_SECONDS + 5)
        # Another thread's flush may be the one serving our reports, so wait for them as well.
        if not all_reported.wait(5.0):
            raise ServiceUnavailable(f"Kafka at {self._bootstrap}: no delivery report")
        return {key: self._landed(*reports[key]) for key, _, _ in tombstones}

    def _produce_one(
        self,
        topic: str,
        key: bytes,
        partition: int,
        headers: Sequence[tuple[str, bytes]],
        on_delivery: Callable[[KafkaError | None, Message], None],
    ) -> None:
        """Queue one tombstone; while the producer's queue is full, serve its reports first."""
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while True:
            try:
                self._producer.produce(
                    topic,
                    key=key,
                    value=None,
                    partition=partition,
                    headers=list(headers),
                    on_delivery=on_delivery,
                )
                return
            except BufferError as exc:
                if time.monotonic() > deadline:
                    raise self._unavailable(exc) from None
                self._producer.poll(0.5)
            except KafkaException as exc:
                raise self._unavailable(exc) from None

    def _landed(self, error: KafkaError | None, message: Message) -> _Delivery | LetheError:
        """Where a delivered tombstone is, or the failed delivery as an error (no key)."""
        if error is not None:
            if error.fatal():
                # An idempotent producer cannot recover: the next step gets a new one.
                self._clients.drop_kafka_producer(self._bootstrap)
            return ServiceUnavailable(f"Kafka at {self._bootstrap}: delivery failed {error.name()}")
        landed, offset = message.partition(), message.offset()
        kind, stamp = message.timestamp()
        if landed is None or offset is None:
            return ServiceUnavailable(f"Kafka at {self._bootstrap}: delivery report without offset")
        if kind == TIMESTAMP_NOT_AVAILABLE:
            stamp = int(time.time() * 1000)
        return _Delivery(partition=landed, offset=offset, timestamp_ms=stamp)

    def _topic_error(
        self, request: StepRequest | BatchStepRequest, topic: str, exc: KafkaException
    ) -> LetheError:
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


def _matches(job: _Job) -> tuple[list[tuple[int, Match]], dict[int, LetheError]]:
    """How the scan knows each subject's records (with the subject's index), and the subjects
    whose value template cannot be filled."""
    locator = TombstoneWriter.locator(job.request)
    matches: list[tuple[int, Match]] = []
    errors: dict[int, LetheError] = {}
    for index, item in enumerate(job.subjects):
        try:
            matches.append((index, _match_of(locator, job.request.step.id, item)))
        except MissingIdentity as exc:  # it names the placeholder, not a value
            errors[index] = exc
    return matches, errors


def _still_there(read: _Read, offset: int) -> bool:
    """The tombstone is at `offset`, or was removed by compaction or retention (the first
    record still in the log is later); not when the log ends before it or holds another."""
    if read.offset is None:
        return False
    return read.offset != offset or (read.key_matches and read.is_tombstone)


def _not_the_tombstone(partition: int, offset: int) -> str:
    return (
        f"the record at partition {partition} offset {offset} is not the tombstone erase wrote "
        "(was the topic recreated?)"
    )


def _still_detail(keys: int, topic: str) -> str:
    return (
        f"{keys} key(s) of topic {topic!r} still have a record of the subject as their latest "
        "(written after the erasure began?)"
    )


def _unreadable_detail(records: int, topic: str) -> str:
    return (
        f"{records} record(s) of topic {topic!r} are not JSON objects: nobody can tell whether "
        "they are the subject's"
    )


def _lost() -> LetheError:
    return ServiceUnavailable("no tombstone recorded")


def _all_failed(batch: BatchStepRequest, erased: BatchStepOutcome, why: str) -> BatchStepOutcome:
    """The verified batch when the erase outcome cannot be checked: every subject failed."""
    return BatchStepOutcome(
        step_id=batch.step.id,
        outcomes=[
            o.model_copy(update={"status": "failed", "detail": why}) for o in erased.outcomes
        ],
        evidence=erased.evidence,
        detail=why,
    )
