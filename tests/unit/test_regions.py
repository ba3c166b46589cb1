"""Region names and task queues."""

from __future__ import annotations

import pytest

from lethe.kernel.errors import UnknownRegion
from lethe.kernel.regions import task_queue


@pytest.mark.parametrize("region", ["eu", "us-east", "a", "apac2"])
def test_task_queue_is_lethe_dash_region(region: str) -> None:
    assert task_queue(region) == f"lethe-{region}"


@pytest.mark.parametrize("region", ["", "EU", "eu!", "-eu", "eu-", "1eu", "x" * 40, "eu west"])
def test_malformed_regions_are_refused(region: str) -> None:
    with pytest.raises(UnknownRegion, match="not a valid region name"):
        task_queue(region)


@pytest.mark.parametrize(
    ("control", "queue"),
    [
        ("lethe-control", "lethe-eu"),
        ("clinic-control", "clinic-eu"),
        ("lethe-e2e-1a2b-control", "lethe-e2e-1a2b-eu"),
        ("billing", "billing-eu"),
    ],
)
def test_regional_queues_belong_to_their_deployment(control: str, queue: str) -> None:
    """Two deployments in one namespace (two control queues) never share a regional queue."""
    assert task_queue("eu", control) == queue
