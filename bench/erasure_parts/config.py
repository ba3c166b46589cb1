"""The run's data map and policy pack, from the templates beside this module, and the check
that they plan what the benchmark measures."""

from __future__ import annotations

from pathlib import Path
from string import Template

from bench import BenchError
from bench.erasure_parts.sample_data import TENANT, Names, request_for
from lethe.plans.planner import Planner

HERE = Path(__file__).resolve().parent
DATAMAP_TEMPLATE = HERE / "datamap.yaml"
POLICY = HERE / "policy.yaml"


def datamap_text(names: Names) -> str:
    """The data map with the run's names filled in."""
    return Template(DATAMAP_TEMPLATE.read_text()).substitute(
        region=names.region,
        tenant=TENANT,
        patients=names.patients,
        appointments=names.appointments,
        labs=names.labs,
        topic=names.topic,
        redis_prefix=names.redis_prefix,
        email_hash=names.email_hash,
        backup_container=names.backup_container,
        log_container=names.log_container,
    )


def write_config(names: Names, folder: Path) -> tuple[Path, Path]:
    """Write the run's data map into `folder`; the data map's and the policy pack's paths."""
    datamap = folder / "datamap.yaml"
    datamap.write_text(datamap_text(names))
    return datamap, POLICY


def check_plan(datamap: Path, pack: Path, names: Names) -> int:
    """Plan one request in-process: no approval, sql/kafka/redis now, blob/logs deferred.

    Returns the number of immediate steps, which the orchestration floor's child runs.
    """
    planner = Planner.from_files(datamap, pack)
    plan = planner.plan(request_for(names.subject_id(0)), "req-bench", "0" * 64)
    immediate = {step.kind for step in plan.steps if step.phase == "immediate"}
    deferred = {step.kind for step in plan.steps if step.phase == "deferred"}
    if plan.approval_required or immediate != {"sql", "kafka", "redis"}:
        raise BenchError(f"unexpected plan: approval {plan.approval_required}, now {immediate}")
    if deferred != {"blob", "logs"}:
        raise BenchError(f"unexpected plan: deferred {deferred}")
    return sum(1 for step in plan.steps if step.phase == "immediate")
