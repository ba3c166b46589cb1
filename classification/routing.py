"""Regional routing: the subject's home region and each system's region decide who runs what."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from classification.datamap import DataMap
from lethe.contracts import RegionPlan, Step
from lethe.errors import LetheError, UnknownRegion


class UnknownTenant(LetheError):
    """The tenant is not in the data map."""


def home_region(datamap: DataMap, tenant: str, requested: str | None = None) -> str:
    """The subject's region: the request's if given (and known), else the tenant's."""
    if tenant not in datamap.tenants:
        raise UnknownTenant(f"tenant {tenant!r} is not in the data map")
    if requested is not None:
        if requested not in datamap.regions:
            raise UnknownRegion(
                f"region {requested[:40]!r} is not one of the data map's regions {datamap.regions}"
            )
        return requested
    return datamap.tenants[tenant].region


def by_region(steps: Iterable[Step]) -> list[RegionPlan]:
    """Steps grouped by their system's region, regions in name order."""
    grouped: dict[str, list[Step]] = defaultdict(list)
    for step in steps:
        grouped[step.region].append(step)
    return [RegionPlan(region=region, steps=grouped[region]) for region in sorted(grouped)]
