"""Pydantic models that cross a boundary: workflow and activity inputs and outputs, CLI JSON."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lethe.classification.datamap import Locator, SystemKind
from lethe.kernel.subjects_file import unprintable


class Contract(BaseModel):
    """Base of every boundary model: immutable, and unknown fields are an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class HealthCheckRequest(Contract):
    """Asks a region's worker to answer, echoing a caller-chosen token."""

    token: str = Field(min_length=1, max_length=200)


class HealthCheckReport(Contract):
    """What the worker that ran the health check says about itself."""

    token: str
    task_queue: str
    worker_identity: str
    answered_at: datetime


# --- erasure ---------------------------------------------------------------------------------

Action = Literal[
    "delete",
    "soft_delete",
    "pseudonymize",
    "anonymize",
    "tombstone",
    "purge",
    "redact",
    "retain",
    "shred",
    "expire",
]
"""What a step does to the subject's data in one locator (`expire`: nothing; the topic's
retention removes it by a date the step gives)."""
Phase = Literal["immediate", "deferred"]
StepStatus = Literal[
    "planned", "held", "running", "done", "pending_compaction", "at_risk", "retained", "failed"
]
"""`done` only when erased and verified; `pending_compaction` and `at_risk` are Kafka's honest
answers when the topic's settings delay or cannot guarantee removal."""


TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
"""A tenant's name: lower-case letters, digits, `_` and `-` (it goes into ids and queries)."""


class Subject(Contract):
    """The person to erase. Their id and identities never print (repr) and never leave payloads."""

    tenant: str = Field(pattern=TENANT_PATTERN)
    subject_id: str = Field(min_length=1, max_length=256, repr=False)
    identities: dict[str, str] = Field(default_factory=dict, repr=False)
    """Other identifiers by name (`email`, `mrn`, ...), for locators that need them."""

    @field_validator("subject_id")
    @classmethod
    def _printable_id(cls, subject_id: str) -> str:
        problem = unprintable(subject_id)
        if problem:
            raise ValueError(f"the subject id {problem}")
        return subject_id

    @field_validator("identities")
    @classmethod
    def _identity_names(cls, identities: dict[str, str]) -> dict[str, str]:
        for position, (name, value) in enumerate(identities.items(), 1):
            if not re.fullmatch(r"[a-z][a-z0-9_]{0,30}", name):
                # Not quoted: a name put where a value belongs would be personal data.
                raise ValueError(
                    f"identity name {position} must be 1 to 31 lower-case letters, digits or _, "
                    "starting with a letter"
                )
            if not value or len(value) > 512:
                raise ValueError(f"identity {name!r} must be 1 to 512 characters")
            problem = unprintable(value)
            if problem:
                raise ValueError(f"identity {name!r} {problem}")
        return identities

    def template_values(self, subject_ref: str) -> dict[str, str]:
        """What a locator template may use: subject id, tenant, reference and identities."""
        values = {"subject_id": self.subject_id, "tenant": self.tenant, "subject_ref": subject_ref}
        values.update({f"identity.{name}": value for name, value in self.identities.items()})
        return values


class Decision(Contract):
    """Why a step does what it does: the rule that decided, on which category, and its law."""

    rule: str
    category: str | None = None
    strategy: str
    citation: str
    exception: str | None = None
    """For `retain`: the GDPR Art. 17(3) exception (or other law) that allows keeping the data."""


class Step(Contract):
    """One locator of one system and what erasure does there."""

    id: str
    """`<system>/<locator index>`, stable within a plan."""
    system: str
    kind: SystemKind
    region: str
    connection: str
    """The name of the environment variable holding the system's connection."""
    locator: Locator
    action: Action
    phase: Phase
    keep_columns: list[str] = []
    """SQL: personal columns a `retain` decision keeps while the rest are cleared."""
    decisions: list[Decision]
    covers: list[str] = []
    """A keys system's shred step: the locators it erases by destroying the keys (topics
    mapped `removal: crypto_shred`), each as `<step id>: <what>`."""


class StepRequest(Contract):
    """An erase or verify call for one step, as a region's worker receives it."""

    request_id: str
    subject_ref: str
    subject: Subject
    step: Step
    erasure_started_at: datetime
    """When the erasure began: backups taken before it must be gone by the end of the window."""
    window_ends_at: datetime
    """The end of the erasure window: deferred deletions and compaction must finish by then."""
    subject_found: bool = True
    """Some step of this erasure found the subject's data, or the subject is on the
    forget-list: only then may a step act on data that holds everyone (whole backups)."""


class StepCheck(Contract):
    """What a preflight found for one step, touching nothing: ready, or each problem in words."""

    step_id: str
    problems: list[str] = []
    """Each names the system and what is wrong (never personal data); empty when ready."""
    transient: bool = False
    """The problems may clear by themselves (unreachable, timeout): retried with backoff."""

    @property
    def ready(self) -> bool:
        """Nothing stands in the step's way."""
        return not self.problems


Evidence = dict[str, str | int | float | bool | None]
"""What a step found and did, as counts and flags; never personal data."""


class StepOutcome(Contract):
    """What an erase or verify call found and did; evidence holds no personal data."""

    step_id: str
    status: StepStatus
    affected: int = 0
    """Rows, keys, tombstones, blobs or log records touched."""
    verified: bool = False
    evidence: Evidence = {}
    detail: str = ""
    gone_by: datetime | None = None
    """When the data is provably gone, where that is later than now (Kafka compaction)."""


class VerifyRequest(Contract):
    """A verify call: the step as planned and what its erase call reported."""

    request: StepRequest
    erased: StepOutcome


class ErasureRequest(Contract):
    """A DPO's or a service's request to erase one subject."""

    subject: Subject
    region: str | None = None
    """The subject's home region, when the tenant's region does not decide it."""
    reason: str = Field(default="", max_length=500)
    requested_by: str = Field(min_length=1, max_length=200)
    dry_run: bool = False
    systems: list[str] = []
    """Only these systems (all when empty): a forget-list replay names the restored system."""
    replay_of: str | None = None
    """The request whose erasure this re-applies after a restore: no approval, no window."""
    retry_of: RetryOf | None = None
    """The closed request whose failed steps this re-runs, under its approval and window."""


class RetryOf(Contract):
    """What a retry carries of the request it retries: which steps, and what still stands."""

    request_id: str
    """The original request (the first one, when a retry is retried)."""
    run_id: str
    """The workflow run whose certificate named the failed steps."""
    steps: list[str] = Field(min_length=1)
    """The step ids to run again; the retry's plan keeps only these."""
    approval: ApprovalDecision | None = None
    """The original approval, which stands (None: the original plan needed none)."""
    started_at: datetime
    """When the original erasure began: its window, and what counts as before it."""
    deadline: datetime
    """The original Art. 12(3) deadline (with its extension, if any)."""
    extension: Extension | None = None


class DryRun(Contract):
    """A dry run: the plan, and what each step's preflight found; nothing was touched."""

    plan: Plan
    preflight: list[StepCheck] = []

    @property
    def ready(self) -> bool:
        """Every step's preflight passed."""
        return all(check.ready for check in self.preflight)


class Submission(Contract):
    """What submitting an erasure did: started a request, or joined the one already running."""

    workflow_id: str
    joined: bool = False
    """A request for the same subject was already running: this one joined it, and its
    identities and reason were not added."""


class RegionPlan(Contract):
    """The steps one region's worker runs."""

    region: str
    steps: list[Step]


class Plan(Contract):
    """What classification and policy decide for one request, shown before anything is destroyed."""

    request_id: str
    subject_ref: str
    tenant: str
    home_region: str
    policy: str
    """The policy pack as `name@version`."""
    datamap_digest: str
    """SHA-256 of the data map the plan was made from."""
    regions: list[RegionPlan]
    approval_required: bool
    approval_reason: str = ""
    deadline_months: int
    max_extension_months: int
    window_days: int
    """The erasure window in whole days, rounded up; `window` holds it exactly."""
    window: timedelta | None = None
    """The erasure window: backups and logs go by its end. None in plans made before windows
    were durations (`window_days` then); read `window_length`."""
    window_ends_after_deadline: bool = False
    """The policy lets the window end after the Art. 12(3) deadline (see `window_note`);
    false, the safe default: it ends at the deadline when that comes first."""
    window_note: str = ""
    """What the plan says about its window and the deadline, in words."""
    retry_of: str | None = None
    """The request whose failed steps this plan retries (it holds only those steps)."""

    @property
    def steps(self) -> list[Step]:
        """Every step of every region."""
        return [step for region in self.regions for step in region.steps]

    @property
    def window_length(self) -> timedelta:
        """The erasure window: `window`, or `window_days` for plans made before it."""
        return self.window if self.window is not None else timedelta(days=self.window_days)


# --- governance ------------------------------------------------------------------------------

HoldScope = Literal["subject", "tenant", "system", "category"]


class Hold(Contract):
    """A legal hold: destructive steps in its scope wait until it is released."""

    id: str
    matter: str
    scope: HoldScope
    value: str
    """Subject scope: the subject reference, never the id; else a tenant, system or category."""
    reason: str = ""
    placed_by: str
    placed_at: datetime
    released_by: str | None = None
    released_at: datetime | None = None
    tenant: str | None = None
    """The tenant it was placed for (a tenant-scope hold's value); None: all tenants."""

    @property
    def active(self) -> bool:
        """Not yet released."""
        return self.released_at is None


class LedgerEntry(Contract):
    """One link of the hash-chained audit ledger; holds no personal data."""

    seq: int
    at: datetime
    request_id: str
    subject_ref: str
    actor: str
    action: str
    system: str | None = None
    details: dict[str, str | int | float | bool | None] = {}
    prev_hash: str
    hash: str
    tenant: str | None = None
    """The request's tenant; None for entries of no one tenant (and entries from before)."""


# --- the erasure workflow ------------------------------------------------------------------------


class ErasureStart(Contract):
    """The erasure workflow's input."""

    request_id: str
    subject_ref: str
    request: ErasureRequest
    received_at: datetime


class RegionJob(Contract):
    """A regional child workflow's input: the steps of one region and one phase."""

    request_id: str
    subject_ref: str
    subject: Subject
    steps: list[Step]
    erasure_started_at: datetime
    window_ends_at: datetime
    erased: dict[str, StepOutcome] = {}
    """Steps already erased whose verification is to be repeated (e.g. pending compaction)."""
    retry_until: datetime | None = None
    """Transient failures are retried until then (a margin before the Art. 12(3) deadline)."""
    subject_found: bool = True
    """Passed on in each StepRequest: whole backups are touched only when this is true."""


class StepProgress(Contract):
    """Where one step stands, as the status query shows it."""

    step_id: str
    system: str
    kind: SystemKind
    region: str
    action: Action
    phase: Phase
    status: StepStatus
    detail: str = ""
    holds: list[str] = []
    attempt: int = 0
    """The attempt running now, when the step is being retried (the SDK fills it in)."""
    last_failure: str = ""
    """Why the last attempt failed, while the step is being retried."""
    next_attempt_at: datetime | None = None


ErasureState = Literal[
    "planning",
    "preflight_failed",
    "awaiting_approval",
    "on_hold",
    "erasing",
    "waiting_window",
    "verifying",
    "completed",
    "rejected",
    "failed",
    "dry_run",
]


class ApprovalDecision(Contract):
    """A DPO's approval or rejection."""

    by: str = Field(min_length=1, max_length=200)
    note: str = Field(default="", max_length=1000)


class Extension(Contract):
    """An Art. 12(3) extension of the deadline, with its recorded reason."""

    months: int = Field(ge=1, le=2)
    reason: str = Field(min_length=3, max_length=1000)
    by: str = Field(min_length=1, max_length=200)


class ErasureStatus(Contract):
    """What the status query answers at any time."""

    request_id: str
    subject_ref: str
    state: ErasureState
    received_at: datetime
    deadline: datetime
    extension: Extension | None = None
    overdue: bool = False
    approval_required: bool = False
    approval: ApprovalDecision | None = None
    window_ends_at: datetime | None = None
    steps: list[StepProgress] = []
    children: list[str] = []
    """The regional workflows running now (runs started before the steps ran from the request
    itself); `Client.status` adds their finished steps."""
    preflight: list[StepCheck] = []
    """The steps whose last preflight found a problem: nothing is destroyed until none does."""
    next_preflight_at: datetime | None = None


Outcome = Literal["erased", "erased_pending_compaction", "incomplete", "rejected", "dry_run"]


class Certificate(Contract):
    """The evidence of a finished request."""

    request_id: str
    subject_ref: str
    tenant: str
    outcome: Outcome
    policy: str
    datamap_digest: str
    requested_by: str
    reason: str
    received_at: datetime
    deadline: datetime
    extension: Extension | None = None
    approval: ApprovalDecision | None = None
    started_at: datetime | None = None
    completed_at: datetime
    plan: Plan
    steps: list[StepOutcome] = []
    ledger_hashes: list[str] = []
    preflight: list[StepCheck] = []
    """A dry run's preflight: every step's check (the problems, when there are any)."""

    def summary(self) -> list[str]:
        """What the outcome means, first line first: the outcome, then each failure with its
        reason, then each caveat (data still in the system, with the date it goes)."""
        failed = [s for s in self.steps if s.status == "failed"]
        caveats = [s for s in self.steps if s.status in ("pending_compaction", "at_risk")]
        planned = {s.id for s in self.plan.steps}
        missing = sorted(planned - {s.step_id for s in self.steps})
        head: str = self.outcome
        if self.outcome == "incomplete":
            kinds = [
                f"{len(failed)} step(s) failed" if failed else "",
                f"{len(caveats)} with a caveat" if caveats else "",
                f"{len(missing)} not run" if missing else "",
            ]
            head += ": " + ", ".join(kind for kind in kinds if kind)
        lines: list[str] = [head]
        lines += [f"failed {s.step_id}: {s.detail or 'no reason recorded'}" for s in failed]
        for step in caveats:
            by = f" by {step.gone_by.isoformat()}" if step.gone_by else ""
            lines.append(f"{step.status} {step.step_id}: gone{by}; {step.detail}".rstrip("; "))
        lines += [f"not run {step_id}" for step_id in missing]
        return lines


class LedgerRecord(Contract):
    """A ledger entry to append, as the workflow asks for it."""

    idempotency_key: str
    request_id: str
    subject_ref: str
    actor: str
    action: str
    system: str | None = None
    details: dict[str, str | int | float | bool | None] = {}
    tenant: str | None = None
    """The request's tenant; None for an entry of no one tenant (key rotation, sweeps)."""


class HoldQuery(Contract):
    """Which of these steps does an active legal hold block?"""

    subject_ref: str
    tenant: str
    steps: list[Step]


class TimelineEvent(Contract):
    """One event of a workflow's history, its payloads decrypted, for auditors."""

    id: int
    at: datetime
    type: str
    detail: str = ""
    payloads: list[object] = []


class RequestSummary(Contract):
    """One erasure request as `lethe audit list` shows it."""

    request: str
    status: str | None = None
    regions: list[str] = []
    started: datetime | None = None
    closed: datetime | None = None


class ForgetListAdd(Contract):
    """An erased subject to put on the forget-list."""

    subject: Subject
    subject_ref: str
    request_id: str
    systems: list[str]


# --- retention -------------------------------------------------------------------------------

RetentionAction = Literal["delete", "anonymize", "soft_delete"]
"""What a storage limit does to data past its period."""
SweepStatus = Literal["done", "kept", "failed", "running"]
"""`done`: what was due is gone (or counted, in a plan); `kept`: the task removes nothing, for
the reason it gives (no limit, a hold on the whole locator, a date it lacks); `failed`: an
error stopped it, named in `detail`."""


class RuleTerm(Contract):
    """One retention rule as a sweep applies it: how long from which date, and why."""

    rule: str
    category: str
    kind: Literal["obligation", "limit"]
    period: timedelta
    trigger: Literal["created", "last_activity", "closed"]
    action: RetentionAction | None = None
    """A limit's action; None for an obligation."""
    citation: str


class ScopeMatch(Contract):
    """Which records of a locator a task covers, by one scope field (a rule's `where`): those
    whose value is one of `values`; or, with `values` empty, those whose value is none of
    `others` (and not null); or, with `null`, those with no value."""

    key: str
    field: str
    """The column or record field holding the key."""
    values: list[str] = []
    others: list[str] = []
    null: bool = False


class SweepTask(Contract):
    """One locator (or one scope of it) of one system, and the rules a sweep applies there."""

    id: str
    """`<system>/<locator index>`, with `/<segment>` when scopes split the locator."""
    system: str
    kind: SystemKind
    region: str
    connection: str
    """The name of the environment variable holding the system's connection."""
    locator: Locator
    tenants: list[str]
    """The tenants whose data the system holds (a tenant hold covers them)."""
    categories: list[str]
    scope: list[ScopeMatch] = []
    """Empty: every record of the locator."""
    limit: RuleTerm | None = None
    """The storage limit that removes records; None: nothing is removed here."""
    obligations: list[RuleTerm] = []
    """Every obligation keeping the records, longest first: a record goes only once all ended."""
    dates: dict[Literal["created", "last_activity", "closed"], str] = {}
    """The field dating the records for each trigger the locator has."""
    nulls: Literal["report", "delete"] = "report"
    kept: str | None = None
    """Why the task removes nothing (no limit applies, the limit's date is not mapped, an
    obligation counts from a date the locator lacks): reported, and no activity runs."""

    @property
    def rules(self) -> list[str]:
        """The ids of the rules deciding the task: the limit, then the obligations."""
        return [term.rule for term in ([self.limit] if self.limit else []) + self.obligations]


class SweepPlan(Contract):
    """What a sweep covers: every task, by the data map and the policy pack."""

    pack: str
    tasks: list[SweepTask]
    warnings: list[str] = []
    """Rules no locator holds data for, and the like: said, never fatal."""


SWEEP_BATCH = 20_000
"""Records per sweep batch by default: a DELETE of 20,000 indexed rows takes about 0.3 s on
PostgreSQL here, short enough to hold row locks briefly and to respect a new legal hold within a
batch, long enough that Temporal's round trip between batches costs under a quarter of the time
(`bench/retention.py`)."""


class SweepRequest(Contract):
    """A retention sweep to run (or, with `dry_run`, to count: `lethe retention plan`)."""

    requested_by: str = Field(min_length=1, max_length=200)
    dry_run: bool = False
    apply: bool = False
    """Also change settings that drift from the rules (Kafka topics' configs, Redis TTLs)."""
    rules: list[str] = []
    """Only tasks these rules decide; empty: all."""
    systems: list[str] = []
    """Only these systems; empty: all."""
    batch_size: int = Field(default=SWEEP_BATCH, ge=1, le=100_000)
    """Records a batch takes (one transaction of a SQL table)."""
    samples: int = Field(default=3, ge=0, le=20)
    """A dry run's row keys per task (never personal data: none where the keys are)."""
    batches_per_run: int = Field(default=500, ge=1, le=10_000)
    """Batches before the workflow continues as new (sooner when Temporal suggests it)."""
    retry_span: timedelta = Field(
        default=timedelta(minutes=30), ge=timedelta(seconds=1), le=timedelta(days=1)
    )
    """How long a batch may keep failing (a system down) before its task is reported failed
    and the sweep goes on; errors of the map or the schema fail it at once."""
    state: SweepState | None = None
    """Carried across continue-as-new; None when the sweep starts."""


class Drift(Contract):
    """One setting of a system that breaks a rule: too short breaks an obligation, too long (or
    none) a limit."""

    target: str
    """The topic, or the key pattern (never a key)."""
    setting: str
    """`retention.ms`, `cleanup.policy`, ..., or `ttl`."""
    found: str
    wanted: str
    breaks: str
    """The rule it breaks and how (`gdpr.device.storage-limit: kept longer than 90d`)."""
    count: int = 1
    """Keys with this drift (Redis); 1 for a topic setting."""
    fixed: bool = False


class SweepBatch(Contract):
    """One call of a region's `<kind>.sweep`: the next batch of one task."""

    run_id: str
    task: SweepTask
    now: datetime
    """The sweep's `as_of`: a record is due when its period ended before it."""
    cursor: list[str | int | float | None] | None = None
    """Where the last batch ended (a SQL keyset, a blob name); None: from the start."""
    batch_size: int
    holds: list[Hold] = []
    """The active legal holds, read by the workflow before this batch."""
    dry_run: bool = False
    apply: bool = False
    samples: int = 0


class SweepResult(Contract):
    """What one batch found and did; never personal data."""

    task_id: str
    removed: int = 0
    """Rows deleted, anonymised or soft-deleted; blobs deleted; log lines removed. In a dry
    run, what would go."""
    held: int = 0
    """Due, but kept for a legal hold."""
    undated: int = 0
    """Records with no date for the limit (or an obligation), reported and kept."""
    cursor: list[str | int | float | None] | None = None
    """Where the next batch starts; None with `done`."""
    done: bool = False
    first: str | None = None
    last: str | None = None
    """The range of dates this batch covered (ISO), for the ledger."""
    drift: list[Drift] = []
    samples: list[str] = []
    detail: str = ""


class TaskReport(Contract):
    """One task's totals in a sweep report."""

    task_id: str
    system: str
    kind: SystemKind
    rules: list[str]
    citations: dict[str, str]
    action: RetentionAction | None = None
    status: SweepStatus
    removed: int = 0
    held: int = 0
    undated: int = 0
    batches: int = 0
    drift: list[Drift] = []
    samples: list[str] = []
    detail: str = ""


class SweepState(Contract):
    """A sweep's progress: the plan, each task's totals, and where the current task is."""

    started_at: datetime
    as_of: datetime
    """The moment the sweep judges by: when the schedule meant it to run, else its start."""
    plan: SweepPlan
    reports: list[TaskReport] = []
    """One per task started so far, in plan order."""
    cursor: list[str | int | float | None] | None = None
    """Where the current (last) task's next batch starts."""


class SweepReport(Contract):
    """What a sweep did (or, dry run, would do), per task: closes the run, kept in the store."""

    run_id: str
    requested_by: str
    dry_run: bool
    apply: bool
    pack: str
    started_at: datetime
    as_of: datetime
    """The moment the sweep judged by (its scheduled time, else its start): a record was due
    when its period had ended by then."""
    finished_at: datetime | None = None
    tasks: list[TaskReport]
    warnings: list[str] = []

    @property
    def removed(self) -> int:
        """Records removed (or, dry run, due) over every task."""
        return sum(task.removed for task in self.tasks)

    @property
    def held(self) -> int:
        """Records kept for legal holds over every task."""
        return sum(task.held for task in self.tasks)


# --- bulk erasure ----------------------------------------------------------------------------

BULK_BATCH = 500
"""Subjects in one batch of a bulk erasure unless the request says otherwise."""
BULK_MAX_BATCH = 2_000
"""The most subjects in one batch: a batch's subjects travel in each step's activity input, and
the workflow task scheduling a batch's steps must stay under gRPC's 4 MB (batches of 5,000 with
five steps did not, measured by bench/bulk.py)."""
BULK_MAX_SUBJECTS = 1_000_000
"""The most subjects one bulk request takes (a subjects file longer than this is refused)."""


class BulkSubject(Contract):
    """One subject of a batch: its reference, and the subject for the connectors."""

    subject_ref: str
    subject: Subject


class BatchStepRequest(Contract):
    """One step of a bulk erasure for one batch of subjects: the same step, many subjects."""

    request_id: str
    """The bulk request's id (ledger entries and connector marks carry it)."""
    batch: int = Field(ge=0)
    step: Step
    subjects: list[BulkSubject] = Field(min_length=1)
    erasure_started_at: datetime
    window_ends_at: datetime
    found: list[str] | None = None
    """The references found somewhere in the immediate phase (whole backups are touched only
    for them); None means every subject counts as found (the immediate phase itself)."""

    def single(self, item: BulkSubject) -> StepRequest:
        """The one-subject request for `item` of this batch (the same step and window)."""
        return StepRequest(
            request_id=f"{self.request_id}/{item.subject_ref}",
            subject_ref=item.subject_ref,
            subject=item.subject,
            step=self.step,
            erasure_started_at=self.erasure_started_at,
            window_ends_at=self.window_ends_at,
            subject_found=self.found is None or item.subject_ref in self.found,
        )


class SubjectOutcome(Contract):
    """What one step did for one subject of a batch."""

    subject_ref: str
    status: StepStatus
    affected: int = 0
    detail: str = ""


class BatchStepOutcome(Contract):
    """What one step did for a batch: one outcome per subject, in the batch's order, and what
    the step proves for all of them."""

    step_id: str
    outcomes: list[SubjectOutcome]
    evidence: Evidence = {}
    detail: str = ""
    gone_by: datetime | None = None

    @property
    def affected(self) -> int:
        """Records, rows, keys or blobs changed for the whole batch."""
        return sum(outcome.affected for outcome in self.outcomes)


BulkPhase = Literal["discover", "immediate", "deferred", "recheck", "held"]
"""`discover`: an offboarding finds the tenant's subjects (reading only); `recheck`: steps left
`pending_compaction` verified again once the window has ended; `held`: subjects set aside for a
legal hold, taken again (every step) once it is released."""
BulkState = Literal[
    "planning",
    "discovering",
    "preflight_failed",
    "awaiting_approval",
    "erasing",
    "paused",
    "on_hold",
    "waiting_window",
    "verifying",
    "completed",
    "cancelled",
    "rejected",
]
SubjectStatus = Literal["pending", "erased", "incomplete", "failed", "held", "skipped", "joined"]
"""Where one subject of a bulk request stands: `skipped` (on the forget-list: erased before),
`joined` (a single request for the subject was running: its certificate is the evidence),
`held` (a legal hold on the subject: waits), `incomplete` (a step not yet proven gone)."""


class BulkCounts(Contract):
    """Subjects of a bulk request by where they stand."""

    model_config = ConfigDict(frozen=False)  # part of BulkProgress, which the workflow keeps

    total: int = 0
    erased: int = 0
    incomplete: int = 0
    failed: int = 0
    held: int = 0
    skipped: int = 0
    joined: int = 0

    @property
    def settled(self) -> int:
        """Subjects with nothing more to do in this phase (held ones are not settled)."""
        return self.erased + self.incomplete + self.failed + self.skipped + self.joined


class BulkStepTotals(Contract):
    """What one step did over every batch so far."""

    model_config = ConfigDict(frozen=False)  # part of BulkProgress, which the workflow keeps

    step_id: str
    system: str
    phase: Phase
    statuses: dict[str, int] = {}
    affected: int = 0


class BulkProgress(Contract):
    """A bulk request as its workflow knows it: the `progress` query's answer, carried across
    continue-as-new, and (closed) the bulk certificate's body."""

    model_config = ConfigDict(frozen=False)
    """The workflow's own state, updated in place as batches finish (every other contract is a
    frozen message)."""

    bulk_id: str
    tenant: str
    state: BulkState = "planning"
    phase: BulkPhase = "immediate"
    received_at: datetime
    deadline: datetime | None = None
    started_at: datetime | None = None
    window_ends_at: datetime | None = None
    completed_at: datetime | None = None
    approval: ApprovalDecision | None = None
    paused_by: str | None = None
    cancelled_by: str | None = None
    cursor: int = 0
    """The last subject (by its place in the file) this phase has taken."""
    batches: int = 0
    """Batches recorded so far, over every phase: each one Merkle root in the ledger."""
    counts: BulkCounts = BulkCounts()
    steps: list[BulkStepTotals] = []
    failures: dict[str, int] = {}
    """Subjects' step failures by reason (the reason's kind, never an id)."""
    held_by: list[str] = []
    """Holds blocking steps for every subject (tenant, system or category holds)."""
    preflight: list[StepCheck] = []
    preflighted: list[BulkPhase] = []
    """The phases whose steps the preflight has passed (once a phase, across continue-as-new)."""
    discovered: dict[str, int] = {}
    """An offboarding's subjects found per step (a subject found in several counts in each)."""
    discover_step: int = 0
    discover_after: str | None = None
    """Where an offboarding's discovery stands: the step it lists, and after which subject."""
    plan: Plan | None = None


class BulkRequest(Contract):
    """What starts a bulk erasure: the subjects are staged in Lethe's store, never here."""

    bulk_id: str = Field(pattern=r"^bulk-[0-9a-f]{12}$")
    tenant: str = Field(pattern=TENANT_PATTERN)
    region: str | None = None
    requested_by: str = Field(min_length=1, max_length=200)
    reason: str = Field(default="", max_length=500)
    source: Literal["file", "offboard"] = "file"
    total: int = Field(ge=0, le=BULK_MAX_SUBJECTS)
    systems: list[str] = []
    batch_size: int = Field(default=BULK_BATCH, ge=1, le=BULK_MAX_BATCH)
    batches_per_run: int = Field(default=20, ge=1)
    received_at: datetime
    progress: BulkProgress | None = None
    """Where a run continued-as-new left off."""


class VerifyBatch(Contract):
    """A batch's step to verify again, and what erasing it did."""

    request: BatchStepRequest
    erased: BatchStepOutcome


class BulkRecheck(Contract):
    """The next step of a batch to verify again: the batch's subjects (in its outcomes' order)
    and what erasing it did."""

    batch: int
    step_id: str
    subjects: list[BulkSubject]
    erased: BatchStepOutcome


class BulkRecheckRecord(Contract):
    """A batch's step verified again, to record (its leaves under a root of their own)."""

    bulk_id: str
    tenant: str
    batch: int
    """The number of the recorded tree (the request's next batch number)."""
    of_batch: int
    """The batch whose step was verified again."""
    verified: BatchStepOutcome


class BulkFound(Contract):
    """Subjects an offboarding found in one page of one locator, to stage."""

    bulk_id: str
    subjects: list[Subject]


class BulkBatch(Contract):
    """The next batch of a phase: the subjects to erase, and what was set aside and why."""

    last_seq: int
    """The place of the last subject looked at (taken or set aside); the next batch starts after."""
    subjects: list[BulkSubject] = []
    set_aside: dict[str, int] = {}
    """Subjects not taken, by status: `skipped`, `joined`, `held`."""
    blocked_by: list[str] = []
    """Holds on the tenant, a system or a category that block a step of the plan: the batch
    waits (nothing taken)."""
    found: list[str] | None = None
    """In the deferred phase, the subjects found somewhere in the immediate phase (whole
    backups are touched only for them); None in the other phases."""
    counts: dict[str, int] = {}
    """The request's subjects by status in Lethe's store, after this batch was taken."""


class BulkBatchQuery(Contract):
    """Which batch to take next."""

    bulk_id: str
    tenant: str
    phase: BulkPhase
    after_seq: int
    size: int
    steps: list[Step]
    held_again: bool = False
    """Take subjects set aside as held (a re-check after holds changed), not pending ones."""


class BulkBatchRecord(Contract):
    """One batch's outcomes, to record: a Merkle root over (subject, step, outcome) leaves in
    one ledger entry, the subjects' statuses (a later phase keeps the worst), the forget-list
    (subjects not listed yet)."""

    bulk_id: str
    tenant: str
    phase: BulkPhase
    batch: int
    subjects: list[str]
    """The batch's subject references, in order (the outcomes' order)."""
    outcomes: list[BatchStepOutcome]
    systems: list[str]
    """The plan's systems (the forget-list keeps them, for a replay after a restore)."""


class BulkRecorded(Contract):
    """What recording a batch gave: the root, its ledger entry, and the statuses it set."""

    root: str
    ledger_hash: str
    statuses: dict[str, int]
    """The batch's subjects by the status they now have."""
    failures: dict[str, int] = {}
    counts: dict[str, int] = {}
    """The request's subjects by status in Lethe's store, after this batch."""


class SubjectsQuery(Contract):
    """One page of the subjects a locator holds for a tenant (tenant offboarding)."""

    request_id: str
    tenant: str
    step: Step
    after: str | None = None
    """The last subject id of the previous page (pages go in subject id order)."""
    limit: int = Field(default=1000, ge=1, le=10_000)


class SubjectsPage(Contract):
    """Subjects found in one locator, with the identities it holds for them."""

    subjects: list[Subject]
    next_after: str | None = None
    """Where the next page starts; None when this was the last."""
