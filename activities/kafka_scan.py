"""Reading a whole topic for the keys whose latest record holds the subject in a value field.

For topics keyed by something other than the subject (a claim id, with the member inside the
JSON value). One scan serves a whole batch of subjects: it reads every partition from its start
to where it ended when the scan began, and keeps, per key, only where its latest record is and
which subjects of the batch (by their index) that record holds, or whether it is a tombstone this
request's step (and batch) wrote. Values are parsed and compared in memory, never kept or shown;
keys stay inside the connector.

Every read of the connector (this scan, the search for earlier tombstones, the read back) uses a
consumer lent by the worker's `Readers` for the cluster: one read at a time per consumer, given
back unassigned when the read ends cleanly (closed otherwise), so that most reads skip a new
client's connection and metadata.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from lethe.kernel.errors import ServiceUnavailable

READ_BATCH = 500
"""How many records the scan takes from the consumer at a time."""
READ_WAIT_SECONDS = 0.5
"""How long a read waits for the next record before it looks at its deadline again."""
END_WAIT_MS = 10
"""How long the broker may hold a reader's fetch at a partition's end (`fetch.wait.max.ms`):
a read that ends where compaction left a gap learns it only from that fetch (partition EOF),
and Kafka's default of 500 ms made each such read wait half a second."""
READERS_KEPT = 4
"""How many idle consumers a worker keeps per cluster and purpose; more are made while more
reads run at once, and closed when given back to a full pool."""
SCAN_GROUP = "lethe-scan"
"""The group id of the scan's consumers (nothing is committed: assign() joins no group)."""
SUBJECT_HEADER = "lethe-subject"
"""The header of a batch's tombstone naming the subject's reference (not personal data)."""


@dataclass(frozen=True)
class Latest:
    """Where a key's latest record is, and whose it is."""

    partition: int
    offset: int
    timestamp_ms: int
    whose: frozenset[int]
    """The subjects (indices of the scan's matches) the record holds in the value field (and
    their tenant, if mapped)."""
    ours: bool
    """A tombstone with this request's and step's headers."""
    owner: str | None = None
    """The subject reference an `ours` tombstone names (`lethe-subject`), if it names one."""

    @property
    def subjects(self) -> bool:
        """The record is one of the batch's subjects'."""
        return bool(self.whose)


@dataclass
class ScanResult:
    """What the scan found, per key and in all."""

    latest: dict[bytes, Latest] = field(default_factory=dict)
    ever: dict[bytes, set[int]] = field(default_factory=dict)
    """Keys with a record of a subject anywhere in the log, and whose."""
    records: int = 0
    unreadable: int = 0
    """Records whose value is not a JSON object: nobody can tell whose they are."""

    def still_the_subjects(self) -> list[Latest]:
        """The keys whose latest record is a subject's."""
        return list(self.to_tombstone().values())

    def to_tombstone(self) -> dict[bytes, Latest]:
        """The keys that need a tombstone now."""
        return {key: latest for key, latest in self.latest.items() if latest.subjects}

    def tombstoned_before(self) -> list[Latest]:
        """Keys whose latest record is this step's tombstone (an earlier attempt's; the
        subject's records under them may be compacted away already)."""
        return [latest for latest in self.latest.values() if latest.ours]

    def superseded(self) -> dict[int, int]:
        """Per subject, the keys that held their records but whose latest record is someone
        else's: compaction removes the older records, and nothing is written for them."""
        counts: dict[int, int] = {}
        for key, latest in self.latest.items():
            for index in self.ever.get(key, set()) - latest.whose if not latest.ours else ():
                counts[index] = counts.get(index, 0) + 1
        return counts


def field_value(value: object, path: str) -> object:
    """The value at a dotted path of a JSON object (None where the path ends early)."""
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _same(found: object, wanted: str) -> bool:
    """A JSON scalar equal to the rendered value (numbers compare by their text)."""
    if isinstance(found, bool) or not isinstance(found, str | int):
        return False
    return str(found) == wanted


@dataclass(frozen=True)
class Match:
    """How a record is the subject's: `value_field` holds `value` (and `tenant_field`, if
    given, holds `tenant`)."""

    value_field: str
    value: str
    tenant_field: str | None = None
    tenant: str = ""

    def holds(self, document: object) -> bool:
        """Whether a parsed value is the subject's record."""
        if not _same(field_value(document, self.value_field), self.value):
            return False
        return self.tenant_field is None or _same(
            field_value(document, self.tenant_field), self.tenant
        )


class Matches:
    """A batch's matches, looked up by the value a record holds (not tried one by one)."""

    def __init__(self, matches: Sequence[Match]) -> None:
        self._fields: dict[str, dict[str, list[int]]] = {}
        self._matches = list(matches)
        for index, match in enumerate(self._matches):
            self._fields.setdefault(match.value_field, {}).setdefault(match.value, []).append(index)

    def whose(self, document: object) -> frozenset[int]:
        """The indices of the matches a parsed value holds."""
        found: set[int] = set()
        for path, by_value in self._fields.items():
            value = field_value(document, path)
            if isinstance(value, bool) or not isinstance(value, str | int):
                continue
            found.update(
                i for i in by_value.get(str(value), ()) if self._matches[i].holds(document)
            )
        return frozenset(found)


def reader(bootstrap: str, group: str, *, partition_eof: bool = False) -> Consumer:
    """A consumer that reads assigned partitions from where it is told and commits nothing
    (`group` only because the client wants one: assign() joins no group)."""
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": partition_eof,
            "fetch.wait.max.ms": END_WAIT_MS,
        }
    )


class Readers:
    """A cluster's consumers for reading partitions with assign(), lent to one read at a time
    (a Consumer must not be used by two threads at once) and kept for the next read: a new
    consumer costs a connection and a metadata round trip, and now and then librdkafka's first
    partition-leader lookup of a new client waits about 0.7 s. Thread-safe."""

    def __init__(self, bootstrap: str, kept: int = READERS_KEPT) -> None:
        self.bootstrap = bootstrap
        self._kept = kept
        self._idle: dict[str, list[Consumer]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def borrow(self, group: str) -> Consumer:
        """An idle consumer of `group`'s, or a new one (blocking: call it in a thread)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker's Kafka readers are closed")
            idle = self._idle.get(group)
            if idle:
                return idle.pop()
        return reader(self.bootstrap, group, partition_eof=True)

    def give_back(self, group: str, consumer: Consumer, *, clean: bool) -> None:
        """Keep a consumer whose read ended `clean`ly, unassigned, for the next read; close it
        if the read failed (its state is unknown), if it cannot unassign, or if enough are kept."""
        if clean:
            try:
                consumer.unassign()
            except KafkaException:
                clean = False
        if clean:
            with self._lock:
                idle = self._idle.setdefault(group, [])
                if not self._closed and len(idle) < self._kept:
                    idle.append(consumer)
                    return
        consumer.close()

    @contextmanager
    def lent(self, group: str) -> Iterator[Consumer]:
        """A consumer for the length of one read (blocking), given back after it."""
        consumer = self.borrow(group)
        clean = False
        try:
            yield consumer
            clean = True
        finally:
            self.give_back(group, consumer, clean=clean)

    def close(self) -> None:
        """Close every idle consumer; consumers lent out are closed when given back."""
        with self._lock:
            self._closed = True
            idle = [consumer for kept in self._idle.values() for consumer in kept]
            self._idle.clear()
        for consumer in idle:
            consumer.close()


def take(consumer: Consumer, most: int, wait: float = READ_WAIT_SECONDS) -> list[Message]:
    """Up to `most` records (or events, such as partition EOF): waits up to `wait` for the
    first, then takes only those already fetched. consume() alone would wait out its whole
    timeout for a batch that a read near a partition's end (or past a gap) never fills."""
    first = consumer.poll(wait)
    if first is None:
        return []
    if most <= 1:
        return [first]
    return [first, *consumer.consume(most - 1, timeout=0)]


class TopicScan:
    """Reads a topic from each partition's start to its end when the scan began (blocking:
    runs in a thread, a slice at a time, so the activity can heartbeat in between)."""

    def __init__(
        self,
        readers: Readers,
        topic: str,
        partitions: int,
        matches: Sequence[Match],
        marks: Sequence[tuple[str, bytes]],
        timeout: float,
    ) -> None:
        self._readers, self._topic, self._matches = readers, topic, Matches(matches)
        self._bootstrap = readers.bootstrap
        self._marks, self._timeout = list(marks), timeout
        self._consumer = readers.borrow(SCAN_GROUP)
        self._started = False
        self._ends: dict[int, int] = {}
        self._partitions = partitions
        self.result = ScanResult()

    @property
    def finished(self) -> bool:
        """Every partition has been read up to its end."""
        return not self._ends

    def start(self) -> None:
        """Bound the scan: each partition from its start to its end now."""
        self._started = True
        places = []
        for partition in range(self._partitions):
            place = TopicPartition(self._topic, partition)
            low, high = self._consumer.get_watermark_offsets(place, timeout=self._timeout)
            if high > low:
                self._ends[partition] = high
                places.append(TopicPartition(self._topic, partition, low))
        if places:
            self._consumer.assign(places)

    def read(self, seconds: float) -> None:
        """Read on for up to `seconds`, or to the end."""
        now = time.monotonic()
        stop, idle_until = now + seconds, now + self._timeout
        while not self.finished and time.monotonic() < stop:
            messages = take(self._consumer, READ_BATCH)
            if not messages:
                if time.monotonic() > idle_until:
                    raise ServiceUnavailable(
                        f"Kafka at {self._bootstrap}: no record read in time while reading "
                        f"topic {self._topic!r}"
                    )
                continue
            idle_until = time.monotonic() + self._timeout
            for message in messages:
                self._take(message)

    def _take(self, message: Message) -> None:
        partition, offset = message.partition(), message.offset()
        if partition is None or offset is None or partition not in self._ends:
            return
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                self._done(partition)
            return
        if offset >= self._ends[partition]:
            self._done(partition)
            return
        self._note(partition, offset, message)
        if offset + 1 >= self._ends[partition]:
            self._done(partition)

    def _done(self, partition: int) -> None:
        self._ends.pop(partition, None)
        if self._ends:
            self._consumer.incremental_unassign([TopicPartition(self._topic, partition)])

    def _note(self, partition: int, offset: int, message: Message) -> None:
        result = self.result
        result.records += 1
        key, value = message.key(), message.value()
        if key is None:
            return
        kind, stamp = message.timestamp()
        if kind == TIMESTAMP_NOT_AVAILABLE:
            stamp = int(time.time() * 1000)
        whose: frozenset[int] = frozenset()
        ours, owner = False, None
        if value is None:
            headers = message.headers() or []
            pairs = list(headers.items()) if isinstance(headers, dict) else headers
            ours = all(mark in pairs for mark in self._marks)
            named = dict(pairs).get(SUBJECT_HEADER) if ours else None
            owner = named.decode(errors="replace") if isinstance(named, bytes) else None
        else:
            try:
                document = json.loads(value)
            except ValueError:
                document = None
            if not isinstance(document, dict):
                result.unreadable += 1
            else:
                whose = self._matches.whose(document)
        if whose:
            result.ever.setdefault(key, set()).update(whose)
        result.latest[key] = Latest(partition, offset, stamp, whose, ours, owner)

    def close(self) -> None:
        """Give the consumer back: kept if the scan read to its end, else closed."""
        self._readers.give_back(SCAN_GROUP, self._consumer, clean=self._started and self.finished)
