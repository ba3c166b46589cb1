"""A step's effect across the attempts of its activity, told through Temporal heartbeats.

A worker can end between a step's effect and the activity's completion; Temporal then runs the
activity again, after its heartbeat timeout, and the retry finds the subject's data gone. The
retry must not make the effect again (every connector's effect is idempotent, or finds its own
first effect) and must not report "0 keys" as if nothing had been done: the certificate keeps
the evidence of the attempt that did the work, or says plainly that it was lost.

So a connector heartbeats its *plan* just before its effect (what it found and is about to
remove, as counts: never names or values) and waits, briefly, until the Temporal server shows
it; after the effect it heartbeats what it removed. Each heartbeat also carries what earlier
attempts told (Temporal keeps only the last heartbeat), and so do the heartbeats of the
verification that follows in the same activity. A retry reads the last one from
`activity.info().heartbeat_details` and its evidence says which of these it found
(`first_attempt_evidence`):

- `recorded`: what the earlier attempts removed arrived; the step's counts include it.
- `planned`: an earlier attempt's plan arrived but not its result: it had found so much and was
  about to remove it (`earlier_found_*`); how much it removed is not known.
- `lost`: an earlier attempt sent nothing that arrived; what it removed, if anything, is not
  known.

(The log connector needs no plan: each blob it rewrites carries marks naming the step and its
count, which a retry reads back; its heartbeats say where to resume.)

Heartbeats are sent asynchronously: the first of an attempt at once, later ones at most every
80% of the heartbeat timeout, and none once the process has ended. So a connector heartbeats
nothing before its plan, unless a long search needs it to stay alive (`alive`). Every connector
activity runs `kept_alive`: while a statement, a read or a flush takes long, it heartbeats the
last details again (at first the earlier attempt's, so a retry still finds them), so the
attempt is not taken for lost and run a second time beside itself. An attempt that
fails with an error before its effect says so in a heartbeat (`failed`): the SDK sends an
attempt's last heartbeat with its failure, so its retry is `recorded`, not `lost`. Counts are
never made up: a count that a missing heartbeat would have told is None.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

from temporalio import activity

from lethe.contracts import BatchStepRequest, Evidence, StepRequest

RECORD = "lethe_effect"
"""The key of a heartbeat's details that holds the step's record."""
ALIVE_SECONDS = 15.0
"""How long an attempt works before it heartbeats only to stay alive (a step's heartbeat timeout
is 20 seconds): until then its first heartbeat is kept for its plan."""
CONFIRM_SECONDS = 2.0
"""How long a plan waits for the Temporal server to show it before the effect goes ahead."""

EarlierEvidence = Literal["recorded", "planned", "lost"]
Stage = Literal["started", "planned", "erased"]

_current: ContextVar[Journal | None] = ContextVar("lethe_effect_journal", default=None)


@dataclass
class _Beats:
    """The attempt's last heartbeat details and when they were last sent."""

    details: tuple[Any, ...]
    at: float = field(default_factory=time.monotonic)


_beats: ContextVar[_Beats | None] = ContextVar("lethe_heartbeats", default=None)


def heartbeat(*details: Any) -> None:
    """Heartbeat `details` (inside an activity; outside one, nothing); `kept_alive` sends them
    again while the work goes on."""
    if not activity.in_activity():
        return
    beats = _beats.get()
    if beats is not None:
        beats.details, beats.at = details, time.monotonic()
    activity.heartbeat(*details)


@contextlib.asynccontextmanager
async def kept_alive() -> AsyncIterator[None]:
    """Keep the activity alive while it works: when no heartbeat went out for a third of its
    heartbeat timeout (at most ALIVE_SECONDS), send the last details again, starting with the
    earlier attempt's (Temporal keeps only the last heartbeat, which a retry reads)."""
    info = activity.info() if activity.in_activity() else None
    if info is None or not info.heartbeat_timeout:
        yield
        return
    every = min(ALIVE_SECONDS, info.heartbeat_timeout.total_seconds() / 3)
    beats = _Beats(tuple(info.heartbeat_details))
    token = _beats.set(beats)

    async def keep() -> None:
        while True:
            await asyncio.sleep(max(beats.at + every - time.monotonic(), 0.05))
            if time.monotonic() - beats.at >= every:
                heartbeat(*beats.details)

    keeper = asyncio.create_task(keep())
    try:
        yield
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        _beats.reset(token)


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _counts(value: object) -> dict[str, int]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): n for k, v in value.items() if (n := _count(v)) is not None}


def _add(into: dict[str, int], counts: Mapping[str, int]) -> None:
    for name, n in counts.items():
        into[name] = into.get(name, 0) + n


@dataclass
class Journal:
    """One attempt's view of the step's effect: what earlier attempts told, what this one does.

    Outside an activity (tests, a connector called directly) it is a first attempt that sends
    nothing."""

    request_id: str
    step_id: str
    attempt: int = 1
    earlier_made: dict[str, int] = field(default_factory=dict)
    """What earlier attempts removed, as far as their heartbeats arrived."""
    unconfirmed: dict[str, int] = field(default_factory=dict)
    """What earlier attempts had found and were about to remove when their heartbeats stopped."""
    lost: int = 0
    """Earlier attempts of which no heartbeat arrived."""
    earlier_progress: dict[str, Any] = field(default_factory=dict)
    """The connector's own progress in the last heartbeat that arrived (e.g. where to resume)."""
    made: dict[str, int] = field(default_factory=dict)
    """What this attempt removed."""
    stage: Stage = "started"
    planned: dict[str, int] = field(default_factory=dict)
    """This attempt's plan, while its effect runs."""
    progress: dict[str, Any] = field(default_factory=dict)
    """The connector's own progress, sent with every heartbeat."""
    _beat_at: float = field(default_factory=time.monotonic)
    _nonce: str = ""

    @classmethod
    def resume(cls, request: StepRequest | BatchStepRequest) -> Journal:
        """This attempt's journal (of one subject's step, or of one batch's), from the earlier
        attempts' last heartbeat; also what `current` answers for the rest of the activity."""
        journal = cls(_journal_id(request), request.step.id)
        if activity.in_activity():
            info = activity.info()
            journal.attempt = info.attempt
            journal._take(info.heartbeat_details)
        _current.set(journal)
        return journal

    @classmethod
    def current(cls, request: StepRequest | BatchStepRequest) -> Journal | None:
        """The journal this activity's erase of the step made, if it made one (verify runs
        after erase in the same activity, and its heartbeats must keep erase's record)."""
        journal = _current.get()
        if journal is None or (journal.request_id, journal.step_id) != (
            _journal_id(request),
            request.step.id,
        ):
            return None
        return journal

    def _take(self, details: Sequence[Any]) -> None:
        record: Mapping[str, Any] | None = None
        for detail in details:
            found = detail.get(RECORD) if isinstance(detail, Mapping) else None
            if isinstance(found, Mapping) and (found.get("request"), found.get("step")) == (
                self.request_id,
                self.step_id,
            ):
                record = found
                self.earlier_progress = {k: v for k, v in detail.items() if k != RECORD}
                self.progress = dict(self.earlier_progress)  # carried on until replaced
        if record is None:
            self.lost = max(self.attempt - 1, 0)
            return
        self.earlier_made = _counts(record.get("made"))
        self.unconfirmed = _counts(record.get("unconfirmed"))
        told_by = _count(record.get("attempt")) or 1
        # Attempts after the one that told this sent nothing that arrived.
        self.lost = (_count(record.get("lost")) or 0) + max(self.attempt - 1 - told_by, 0)
        if record.get("stage") == "planned":
            _add(self.unconfirmed, {k: n for k, n in _counts(record.get("planned")).items() if n})

    # --- what earlier attempts told --------------------------------------------------------

    @property
    def earlier(self) -> EarlierEvidence | None:
        """What the retry knows of the earlier attempts; None on a first attempt."""
        if self.attempt <= 1 and not (self.earlier_made or self.unconfirmed or self.lost):
            return None
        if self.lost:
            return "lost"
        if self.unconfirmed:
            return "planned"
        return "recorded"

    def total(self, name: str, planned: str | None = None) -> int | None:
        """How many `name` (e.g. `keys_unlinked`) the step's attempts made: None when an
        earlier attempt's count is not known. `planned` names the plan's count the effect
        works on (`keys`): an earlier plan that found none of those made none."""
        if self.earlier == "lost":
            return None
        if self.earlier == "planned" and (planned is None or self.unconfirmed.get(planned)):
            return None
        return self.earlier_made.get(name, 0) + self.made.get(name, 0)

    def affected(self, *names: str) -> int:
        """What the step touched, at least: what attempts counted (of `names`, or of every
        count when none is given), and what an earlier attempt was about to remove when its
        heartbeats stopped (unless this attempt removed more)."""

        def summed(counts: Mapping[str, int]) -> int:
            return sum(n for k, n in counts.items() if not names or k in names)

        return summed(self.earlier_made) + max(summed(self.made), sum(self.unconfirmed.values()))

    def evidence(self) -> Evidence:
        """On a retry, what the certificate says about the earlier attempts; else nothing."""
        earlier = self.earlier
        if earlier is None:
            return {}
        evidence: Evidence = {
            "first_attempt_evidence": earlier,
            "earlier_attempts": self.attempt - 1,
        }
        evidence.update({f"earlier_found_{k}": n for k, n in sorted(self.unconfirmed.items())})
        evidence.update({f"retry_{k}": n for k, n in sorted(self.made.items())})
        return evidence

    # --- what this attempt tells -----------------------------------------------------------

    def record(self) -> dict[str, Any]:
        """The heartbeat details that tell this attempt's state and the earlier ones'."""
        made = dict(self.earlier_made)
        _add(made, self.made)
        return {
            RECORD: {
                "request": self.request_id,
                "step": self.step_id,
                "attempt": self.attempt,
                "stage": self.stage,
                "made": made,
                "unconfirmed": self.unconfirmed,
                "lost": self.lost,
                "planned": self.planned,
                "nonce": self._nonce,
            },
            **self.progress,
        }

    def beat(self) -> None:
        """Heartbeat the record now (inside an activity)."""
        self._beat_at = time.monotonic()
        heartbeat(self.record())

    def alive(self, **progress: Any) -> None:
        """Heartbeat to stay alive during a long search or check, at most every ALIVE_SECONDS:
        a first attempt's first heartbeat is kept for its plan."""
        self.progress.update(progress)
        if time.monotonic() - self._beat_at >= ALIVE_SECONDS:
            self.beat()

    async def plan(self, **found: int) -> None:
        """Tell what this attempt found and is about to remove, and wait until the server
        shows it (up to CONFIRM_SECONDS), so that a worker lost during the effect leaves it."""
        self.stage, self.planned = "planned", dict(found)
        self._nonce = uuid.uuid4().hex
        self.beat()
        if any(found.values()) and activity.in_activity():
            await _confirmed(self._nonce)

    def erased(self, **made: int) -> None:
        """Tell what this attempt removed (best effort: heartbeats after the first of an
        attempt wait out the SDK's throttle, so a lost worker may not send it)."""
        self.stage, self.planned = "erased", {}
        _add(self.made, made)
        self.beat()

    def failed(self) -> None:
        """Tell, before an error ends the attempt, that it removed nothing yet if it had not
        reached its effect: the SDK sends an attempt's last heartbeat before its failure."""
        if self.stage == "started":
            self.beat()


def _journal_id(request: StepRequest | BatchStepRequest) -> str:
    """Whose effect a journal tells: a request's, or one batch's of a bulk request."""
    if isinstance(request, BatchStepRequest):
        return f"{request.request_id}#{request.batch}"
    return request.request_id


async def _confirmed(nonce: str) -> bool:
    """Wait until the Temporal server holds the heartbeat with `nonce` for this attempt of the
    activity; False when it does not within CONFIRM_SECONDS (or cannot be asked)."""

    def carries_nonce(details: Sequence[Any]) -> bool:
        for detail in details:
            record = detail.get(RECORD) if isinstance(detail, Mapping) else None
            if isinstance(record, Mapping) and record.get("nonce") == nonce:
                return True
        return False

    return await heartbeat_held(carries_nonce, CONFIRM_SECONDS)


async def last_heartbeat_held(details: Any, seconds: float = CONFIRM_SECONDS) -> bool:
    """Wait until the Temporal server holds `details` (JSON-plain: what it decodes to) as this
    attempt's last heartbeat; False when it does not within `seconds` (or cannot be asked)."""
    return await heartbeat_held(lambda held: bool(held) and held[-1] == details, seconds)


async def heartbeat_held(matches: Callable[[Sequence[Any]], bool], seconds: float) -> bool:
    """Wait until the Temporal server holds a heartbeat of this attempt of the activity whose
    details `matches`, asking it (describing the workflow: the pending activity's details);
    heartbeats go out asynchronously, so an effect that a retry must know of asks first.
    False outside a workflow's activity, when asking fails, or after `seconds`: the effect
    goes ahead anyway, and the retry then says what it could not know."""
    if not activity.in_activity():
        return False
    info = activity.info()
    try:
        client = activity.client()
    except RuntimeError:  # an ActivityEnvironment without a client
        return False
    if info.workflow_id is None:  # not a workflow's activity: no one to ask
        return False
    handle = client.get_workflow_handle(info.workflow_id, run_id=info.workflow_run_id)
    deadline, pause = time.monotonic() + seconds, 0.01
    while True:
        try:
            described = await handle.describe(rpc_timeout=timedelta(seconds=seconds))
            for pending in described.raw_description.pending_activities:
                payloads = list(pending.heartbeat_details.payloads)
                if (
                    pending.activity_id != info.activity_id
                    or pending.attempt != info.attempt
                    or not payloads
                ):
                    continue
                if matches(await client.data_converter.decode(payloads)):
                    return True
        except Exception:  # asking is a courtesy: the effect goes ahead anyway
            activity.logger.warning("could not confirm the heartbeat", exc_info=True)
            return False
        if time.monotonic() + pause > deadline:
            activity.logger.warning("the heartbeat did not reach the server in time")
            return False
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.2)
