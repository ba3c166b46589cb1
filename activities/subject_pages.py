"""What finding a tenant's subjects (tenant offboarding) shares across kinds of system: the
tenant check, and a `Subject` made of what a system holds, or nothing when it cannot be one."""

from __future__ import annotations

import logging

from pydantic import ValidationError

from lethe.contracts import Subject
from lethe.kernel.errors import LetheError

log = logging.getLogger(__name__)


class InvalidTenant(LetheError):
    """The query names a tenant no subject can belong to."""


def check_tenant(tenant: str) -> None:
    """InvalidTenant unless `tenant` is a name a subject's tenant may have."""
    try:
        Subject(tenant=tenant, subject_id="x")
    except ValidationError:
        raise InvalidTenant(
            f"tenant {tenant[:64]!r} is not a tenant name: lower-case letters, digits, _ and -"
        ) from None


def found_subject(
    tenant: str, subject_id: str, identities: dict[str, str | None] | None = None
) -> Subject | None:
    """The subject `subject_id` of `tenant` with each identity a subject may hold (blank or
    None ones, and too long or unprintable ones, left out); None when the id cannot be a
    subject's (too long, unprintable)."""
    try:
        subject = Subject(tenant=tenant, subject_id=subject_id)
    except ValidationError:
        return None
    kept: dict[str, str] = {}
    for name, value in (identities or {}).items():
        if value is None or not value.strip():
            continue
        try:
            Subject(tenant=tenant, subject_id="x", identities={name: value})
        except ValidationError:
            continue  # no locator could use it either
        kept[name] = value
    return subject.model_copy(update={"identities": kept}) if kept else subject


def log_left_out(system: str, where: str, count: int) -> None:
    """Say (a count, never an id) that `count` ids found in `where` could not be subjects'."""
    if count:
        log.warning(
            "system %s, %s: %d id(s) left out of a page (no valid subject id)", system, where, count
        )
