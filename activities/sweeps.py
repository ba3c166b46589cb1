"""What every kind's retention sweep shares: which legal holds keep what.

A sweep batch arrives with the active holds, read by the workflow just before it. A hold on the
system, or on a category of the locator (or a parent of one), keeps the whole task. A tenant hold
keeps that tenant's records: by the record's tenant field where the locator has one, else the
whole task when the system holds that tenant. A subject hold keeps the records of that subject,
found by the reference of each record's subject (under each tenant the record may belong to).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

from lethe.classification.taxonomy import matches
from lethe.contracts import Hold, SweepTask
from lethe.kernel.config import current_settings
from lethe.kernel.subjects import subject_ref


@dataclass(frozen=True)
class SweepHolds:
    """The active holds as they bear on one task."""

    whole: list[str]
    """Ids of the holds that keep the whole task (system, category, or a tenant the task cannot
    tell apart)."""
    tenants: frozenset[str]
    """Tenants whose records are kept, where the locator has a tenant field."""
    subjects: frozenset[str]
    """References of subjects whose records are kept."""

    @property
    def any(self) -> bool:
        """Some hold keeps some records of the task."""
        return bool(self.whole or self.tenants or self.subjects)

    @functools.cached_property
    def _key(self) -> bytes:
        return current_settings().subject_key_bytes

    def keeps_subject(self, subject_id: str, tenants: Iterable[str]) -> bool:
        """True if a subject hold covers this subject id under any of these tenants."""
        if not self.subjects:
            return False
        return any(
            subject_ref(tenant, subject_id, self._key) in self.subjects for tenant in tenants
        )


def tenant_field(task: SweepTask) -> str | None:
    """The field of the task's records holding their tenant (a `tenant` scope), if any."""
    scopes = getattr(task.locator, "retention", None)
    field = scopes.scopes.get("tenant") if scopes is not None else None
    return field or getattr(task.locator, "tenant_column", None)


def sweep_holds(task: SweepTask, holds: Iterable[Hold]) -> SweepHolds:
    """How the active holds bear on `task`."""
    whole: list[str] = []
    tenants: set[str] = set()
    subjects: set[str] = set()
    by_field = tenant_field(task) is not None
    for hold in holds:
        if not hold.active:
            continue
        if _keeps_all(hold, task):
            whole.append(hold.id)
        elif hold.scope == "tenant" and hold.value in task.tenants:
            if by_field:
                tenants.add(hold.value)
            else:
                whole.append(hold.id)
        elif hold.scope == "subject":
            subjects.add(hold.value)
    return SweepHolds(whole=whole, tenants=frozenset(tenants), subjects=frozenset(subjects))


def _keeps_all(hold: Hold, task: SweepTask) -> bool:
    """A hold on the task's system, or on one of its categories (or a parent or a child)."""
    if hold.scope == "system":
        return hold.value == task.system
    if hold.scope == "category":
        return any(matches(hold.value, key) or matches(key, hold.value) for key in task.categories)
    return False
