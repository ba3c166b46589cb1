"""Region names and the task queue each region's worker polls."""

from __future__ import annotations

import re

from lethe.errors import UnknownRegion

_REGION = re.compile(r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$|^[a-z]$")
TASK_QUEUE_PREFIX = "lethe-"


def validate_region(region: str) -> str:
    """Return the region name unchanged, or raise UnknownRegion if it is not a valid name."""
    if not _REGION.fullmatch(region):
        raise UnknownRegion(
            f"region {region[:40]!r} is not a valid region name: use lower-case letters, "
            "digits and dashes, starting with a letter (e.g. 'eu', 'us-east')"
        )
    return region


def task_queue(region: str) -> str:
    """The task queue of a region's worker: `lethe-<region>`."""
    return TASK_QUEUE_PREFIX + validate_region(region)
