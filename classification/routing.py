"""Regional routing: the subject's home region and each system's region decide who runs what."""

from __future__ import annotations

from lethe.classification.datamap import DataMap, System
from lethe.kernel.errors import LetheError, UnknownRegion


class UnknownTenant(LetheError):
    """The tenant is not in the data map."""


class RegionContradiction(LetheError):
    """The request names a home region other than the one its tenant's subjects live in."""


def home_region(datamap: DataMap, tenant: str, requested: str | None = None) -> str:
    """The subject's region: the tenant's. A requested region must be known and agree."""
    if tenant not in datamap.tenants:
        raise UnknownTenant(f"tenant {tenant[:64]!r} is not in the data map")
    home = datamap.tenants[tenant].region
    if requested is not None:
        if requested not in datamap.regions:
            raise UnknownRegion(
                f"region {requested[:40]!r} is not one of the data map's regions {datamap.regions}"
            )
        if requested != home:
            raise RegionContradiction(
                f"tenant {tenant!r} lives in region {home!r}, not {requested!r}: the systems "
                "that hold its subjects are named in the data map (`tenants:` of each system); "
                "drop --region or correct the data map"
            )
    return home


class NoSystemHoldsTenant(LetheError):
    """No system of the data map holds subjects of the tenant."""


def systems_of(datamap: DataMap, tenant: str, requested_region: str | None = None) -> list[System]:
    """The systems that may hold data of a tenant's subjects; the tenant must be known, a
    requested region must agree with its home, and some system must hold it."""
    home_region(datamap, tenant, requested_region)
    systems = datamap.systems_of(tenant)
    if not systems:
        raise NoSystemHoldsTenant(
            f"no system of the data map holds subjects of tenant {tenant!r}: list the tenant "
            "under the `tenants` of the systems that hold them"
        )
    return systems
