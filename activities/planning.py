"""The planning activity: the planner of the configured data map and policy pack, cached."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from temporalio import activity

from lethe.contracts import ErasureRequest, Plan
from lethe.kernel.config import current_settings
from lethe.kernel.errors import ConfigurationError, LetheError
from lethe.plans.planner import Planner


@lru_cache(maxsize=4)
def _planner(datamap_path: Path, pack_path: Path, mtimes: tuple[float, float]) -> Planner:
    return Planner.from_files(datamap_path, pack_path)


def planner_from_settings() -> Planner:
    """The planner for LETHE_DATAMAP and LETHE_POLICY, reloaded when either file changes."""
    settings = current_settings()
    if settings.datamap is None or settings.policy is None:
        raise ConfigurationError("LETHE_DATAMAP and LETHE_POLICY must name the data map and pack")
    mtimes = (settings.datamap.stat().st_mtime, settings.policy.stat().st_mtime)
    return _planner(settings.datamap, settings.policy, mtimes)


@activity.defn(name="planning.plan")
async def plan_erasure(request: ErasureRequest, request_id: str, subject_ref: str) -> Plan:
    """Plan an erasure; a request or map that cannot be planned fails without retrying."""
    try:
        return planner_from_settings().plan(request, request_id, subject_ref)
    except LetheError as exc:
        raise exc.to_application_error() from None
