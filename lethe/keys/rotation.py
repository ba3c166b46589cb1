"""Key rotation's contracts: what `KeyRotationWorkflow` takes, carries, answers and returns.

A rotation makes a new KEK version, rewraps every data key under it in batches, checks that no
key is left on an older version, raises the minimum decryption version, and after a grace period
retires (destroys) the older versions. One rotation runs per deployment at a time: the workflow
id is fixed, so starting a second one joins the first.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

from pydantic import Field

from lethe.contracts import Contract

ROTATION_WORKFLOW_ID = "key-rotation"
ROTATION_SCHEDULE_ID = "lethe-key-rotation"
DEFAULT_CONTROL_QUEUE = "lethe-control"
KIND = "key-rotation"
"""The LetheKind search attribute of a rotation."""

RotationPhase = Literal[
    "creating", "rewrapping", "verifying", "raising", "grace", "retiring", "done"
]
"""Where a rotation is: `verifying` waits for every process to see the new version, then
counts what is left on older ones (and goes back to `rewrapping` if anything is)."""


def rotation_workflow_id(control_queue: str) -> str:
    """The rotation's workflow id for a deployment (`key-rotation` on the default queue).

    Deployments that share a Temporal namespace have their own control queues, and each its own
    key store, so each gets its own rotation.
    """
    if control_queue == DEFAULT_CONTROL_QUEUE:
        return ROTATION_WORKFLOW_ID
    return f"{ROTATION_WORKFLOW_ID}-{control_queue}"


def rotation_schedule_id(control_queue: str) -> str:
    """The rotation Schedule's id for a deployment (`lethe-key-rotation` on the default queue)."""
    if control_queue == DEFAULT_CONTROL_QUEUE:
        return ROTATION_SCHEDULE_ID
    return f"{ROTATION_SCHEDULE_ID}-{control_queue}"


class RotationState(Contract):
    """What a rotation has done so far; carried from run to run through continue-as-new."""

    rotation_id: str
    """`key-rotation/<first run id>`: the same for every retry and every run of the rotation."""
    phase: RotationPhase = "creating"
    started_at: datetime
    target: int | None = None
    """The KEK version every data key ends up wrapped by."""
    retire: list[int] = Field(default_factory=list)
    """The older versions to retire once the minimum decryption version is raised."""
    to_rewrap: int = 0
    """Data keys below the target when it was made: an estimate, encryption goes on meanwhile."""
    cursor: tuple[str, int] | None = None
    """The last data key (subject reference, version) the current pass has scanned."""
    rewrapped: int = 0
    """Keys this rotation's passes rewrapped, as the rewrap calls reported them."""
    passes: int = 1
    """Rewrap passes over the key store; a second one runs when keys were left behind."""
    resumes: int = 0
    """Rewrap calls that resumed from a heartbeat checkpoint after a worker was lost."""
    runs: int = 1
    """Workflow runs: one more after each continue-as-new."""
    settled_at: datetime | None = None
    """When every process sees the new version (their KEK caches have expired)."""
    grace_ends_at: datetime | None = None


class RotationRequest(Contract):
    """The rotation workflow's input: how to rotate, and (after continue-as-new) how far it got."""

    batch_size: int = Field(default=1000, ge=1, le=10_000)
    """Data keys rewrapped per transaction."""
    grace: timedelta = Field(default=timedelta(days=7), ge=timedelta(0))
    """How long old versions stay (disabled, not destroyed) after the minimum is raised."""
    keys_per_run: int = Field(default=100_000, ge=1)
    """Keys scanned per workflow run before it continues as new (its history stays small)."""
    requested_by: str = Field(default="schedule", min_length=1, max_length=200)
    """Who asked for the rotation (recorded in the ledger)."""
    state: RotationState | None = None
    """Set by the workflow itself when it continues as new; None to start a rotation."""


class RotationPlan(Contract):
    """What `keys.begin_rotation` made: the target version and what will be retired."""

    target: int
    retire: list[int]
    to_rewrap: int
    settle_seconds: float
    """How long processes may keep using the old version for new keys (their KEK cache)."""


class RewrapCall(Contract):
    """One `keys.rewrap` activity call: rewrap from `after` for up to `max_keys` or seconds."""

    target: int
    after: tuple[str, int] | None = None
    batch_size: int = Field(ge=1)
    max_keys: int = Field(ge=1)
    max_seconds: float = Field(gt=0)


class RewrapProgress(Contract):
    """How far one rewrap call got: also its heartbeat checkpoint."""

    rewrapped: int = 0
    scanned: int = 0
    cursor: tuple[str, int] | None = None
    done: bool = False
    """True when the pass reached the end of the keys below the target."""
    resumed: bool = False
    """True when this call started from a checkpoint an earlier attempt heartbeated."""


class VersionStep(Contract):
    """A step on KEK versions (raise the minimum, retire) with what the ledger records."""

    rotation_id: str
    target: int
    versions: list[int] = Field(default_factory=list)
    requested_by: str


class RotationProgress(Contract):
    """What the `progress` query answers: where the rotation stands."""

    workflow_id: str
    phase: RotationPhase
    started_at: datetime
    target: int | None
    old_versions: list[int]
    to_rewrap: int
    rewrapped: int
    passes: int
    resumes: int
    runs: int
    grace_ends_at: datetime | None


class RotationResult(Contract):
    """A finished rotation."""

    rotation_id: str
    target: int
    retired: list[int]
    rewrapped: int
    """As the rewrap calls reported it; a call lost with its worker may have rewrapped keys it
    never reported, so the key store (`lethe keys status`) is the authority."""
    passes: int
    resumes: int
    runs: int
    started_at: datetime
    finished_at: datetime
