"""The stack's environment: `.stack/env`, which `scripts/stack up` writes, and its variables."""

from __future__ import annotations

import os
from pathlib import Path

from lethe.kernel.config import load_env_file

ROOT = Path(__file__).resolve().parents[2]
"""The repository."""
STACK_ENV = ROOT / ".stack" / "env"
TEMPORAL_PID = ROOT / ".stack" / "temporal" / "pid"


class StackNotReady(Exception):
    """A variable that points at the stack is not set: the stack is not up."""


def load_stack_env() -> None:
    """Set the variables `.stack/env` holds, where the environment does not set them already."""
    load_env_file(STACK_ENV)


def stack_variable(name: str) -> str:
    """A variable that points at the stack, or StackNotReady saying what to run."""
    value = os.environ.get(name)
    if not value:
        raise StackNotReady(f"{name} is not set: run `scripts/stack up` (it writes .stack/env)")
    return value


def temporal_pid() -> int | None:
    """The stack's Temporal dev server, from the pid file `scripts/stack` writes."""
    try:
        return int(TEMPORAL_PID.read_text().strip())
    except (OSError, ValueError):
        return None


SERVICE_PIDS = {
    "PostgreSQL": ROOT / ".stack" / "postgres" / "data" / "postmaster.pid",
    "Redis": ROOT / ".stack" / "redis" / "pid",
    "Kafka": ROOT / ".stack" / "kafka" / "pid",
}
"""Where `scripts/stack` (and PostgreSQL itself) keep the data services' process ids."""


def service_pids() -> dict[str, int]:
    """The stack's data services that are running, by name (PostgreSQL's postmaster: its
    backends are its children)."""
    found = {}
    for name, path in SERVICE_PIDS.items():
        try:
            found[name] = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return found
