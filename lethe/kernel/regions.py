"""Region names and the task queue each region's worker polls."""

from __future__ import annotations

import re

from lethe.kernel.errors import UnknownRegion

_REGION = re.compile(r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$|^[a-z]$")
CONTROL_QUEUE = "lethe-control"
"""The default control queue; its deployment's regional queues are `lethe-<region>`."""


def validate_region(region: str) -> str:
    """Return the region name unchanged, or raise UnknownRegion if it is not a valid name."""
    if not _REGION.fullmatch(region):
        raise UnknownRegion(
            f"region {region[:40]!r} is not a valid region name: use lower-case letters, "
            "digits and dashes, starting with a letter (e.g. 'eu', 'us-east')"
        )
    return region


def deployment_prefix(control_queue: str = CONTROL_QUEUE) -> str:
    """What a deployment's regional queues start with: its control queue without `control`
    (`lethe-` for `lethe-control`, `clinic-` for `clinic-control`, else the queue and `-`)."""
    return (
        control_queue.removesuffix("control")
        if control_queue.endswith("-control")
        else (f"{control_queue}-")
    )


def task_queue(region: str, control_queue: str = CONTROL_QUEUE) -> str:
    """The task queue of a region's worker in the deployment of `control_queue`: `lethe-<region>`
    for the default one, so two deployments in one namespace never run each other's steps."""
    return deployment_prefix(control_queue) + validate_region(region)
