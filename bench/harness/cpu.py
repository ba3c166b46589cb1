"""CPU time, from psutil: the machine's, named processes', and this process tree's.

A benchmark samples before and after a phase and divides what was spent by the work done, so
the figures are CPU per erasure (or per workflow) of each process, and how busy the machine's
cores were meanwhile.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import psutil


def _process_seconds(process: psutil.Process) -> float | None:
    """User and system CPU seconds of one process (not its children), None once it is gone."""
    try:
        times = process.cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return times.user + times.system


def _tree_seconds(process: psutil.Process) -> float | None:
    """CPU seconds of a server and its children, live or ended (PostgreSQL's backends)."""
    own = _process_seconds(process)
    if own is None:
        return None
    try:
        times, children = process.cpu_times(), process.children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return own
    live = sum(s for child in children if (s := _process_seconds(child)) is not None)
    return own + times.children_user + times.children_system + live


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds used so far: by the machine (busy and in all, over every core) and by a few
    named processes."""

    busy: float
    total: float
    processes: dict[str, float]

    @classmethod
    def take(cls, pids: Mapping[str, int], trees: Mapping[str, int] | None = None) -> CpuSample:
        """Sample the machine, the processes `pids` names and the servers `trees` names with
        their children (those already gone are left out)."""
        machine = psutil.cpu_times()
        # The first eight fields, as Linux's /proc/stat counts them; guest time is in user.
        total = sum(
            getattr(machine, name, 0.0)
            for name in ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
        )
        idle = machine.idle + getattr(machine, "iowait", 0.0)
        processes = {}
        for sample, named in ((_process_seconds, pids), (_tree_seconds, trees or {})):
            for name, pid in named.items():
                with contextlib.suppress(psutil.NoSuchProcess):
                    seconds = sample(psutil.Process(pid))
                    if seconds is not None:
                        processes[name] = seconds
        return cls(busy=total - idle, total=total, processes=processes)


@dataclass(frozen=True)
class CpuSpent:
    """CPU spent between two samples: seconds per process, and the machine's busy share."""

    seconds: dict[str, float]
    machine_busy: float
    """The fraction of all cores' time that was not idle."""
    cores: int


def spent(before: CpuSample, after: CpuSample) -> CpuSpent | None:
    """What each process (sampled both times) and the machine spent between the samples; None
    when no time passed between them."""
    if after.total == before.total:
        return None
    return CpuSpent(
        seconds={
            name: after.processes[name] - start
            for name, start in before.processes.items()
            if name in after.processes
        },
        machine_busy=(after.busy - before.busy) / (after.total - before.total),
        cores=psutil.cpu_count() or 1,
    )


def process_tree_seconds() -> float:
    """CPU seconds used so far by this process and its children (a server it started)."""
    me = psutil.Process()
    return sum(s for p in (me, *me.children()) if (s := _process_seconds(p)) is not None)
