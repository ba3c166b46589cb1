"""The erasure planner: classification and policy turn a request into a Plan, touching nothing."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import timedelta
from pathlib import Path

from lethe.classification import routing
from lethe.classification.datamap import (
    DEFERRED_KINDS,
    BlobBackupLocator,
    BlobSystem,
    DataMap,
    KafkaSystem,
    KafkaTopicLocator,
    KeysLocator,
    KeysSystem,
    LogLocator,
    LogsSystem,
    RedisLocator,
    RedisSystem,
    SqlSystem,
    System,
    load_datamap,
    template_fields,
)
from lethe.classification.taxonomy import category
from lethe.contracts import ErasureRequest, Plan, RegionPlan, Step
from lethe.kernel.deadlines import format_duration, shortest_months
from lethe.kernel.errors import LetheError
from lethe.policies.engine import decide, locator_action, sql_action
from lethe.policies.model import PolicyPack, load_pack


class PlanningFailed(LetheError):
    """The request cannot be planned against this data map and policy."""


class Planner:
    """Makes plans from one data map and one policy pack."""

    def __init__(self, datamap: DataMap, pack: PolicyPack, datamap_digest: str) -> None:
        self.datamap = datamap
        self.pack = pack
        self.datamap_digest = datamap_digest

    @classmethod
    def from_files(cls, datamap_path: Path, pack_path: Path) -> Planner:
        """A planner for the data map and policy pack in these files."""
        digest = hashlib.sha256(datamap_path.read_bytes()).hexdigest()
        return cls(load_datamap(datamap_path), load_pack(pack_path), digest)

    def plan(
        self,
        request: ErasureRequest,
        request_id: str,
        subject_ref: str,
        *,
        check_identities: bool = True,
    ) -> Plan:
        """The plan for one request: every locator of every system, its action and its basis.
        A bulk request plans once per tenant without identities (`check_identities=False`) and
        checks each subject against `needed_identities` instead."""
        subject = request.subject
        home = routing.home_region(self.datamap, subject.tenant, request.region)
        # Only the systems that hold the subject's tenant: nothing of the subject goes to a
        # system, or to a region's worker, that never held their data.
        holding = routing.systems_of(self.datamap, subject.tenant, request.region)
        known = {system.name for system in self.datamap.systems}
        unknown = sorted(set(request.systems) - known)
        if unknown:
            raise PlanningFailed(f"system(s) {', '.join(unknown)} are not in the data map")
        held = {system.name for system in holding}
        steps = [
            step
            for system in holding
            if not request.systems or system.name in request.systems
            for step in self._steps(system, held, subject.tenant)
        ]
        steps = _shredded_topics(steps, held, subject.tenant)
        if not steps and request.systems:
            raise PlanningFailed(
                f"none of the systems {', '.join(request.systems)} holds subjects of tenant "
                f"{subject.tenant!r}"
            )
        if not steps:
            raise routing.NoSystemHoldsTenant(
                f"no system of the data map holds subjects of tenant {subject.tenant!r} (only "
                "whole backups of systems that do not hold them): list the tenant under the "
                "`tenants` of the systems that hold them"
            )
        if check_identities:
            self._check_identities(steps, subject.template_values(subject_ref))
        special = sorted(
            {
                d.category
                for step in steps
                for d in step.decisions
                if d.category and category(d.category).special and step.action != "retain"
            }
        )
        approval = self.pack.erasure.approval
        reason = ""
        if approval.always:
            reason = f"policy {self.pack.label} asks for approval of every erasure"
        elif approval.special_category and special:
            reason = f"the plan erases special-category data ({', '.join(special)})"
        return Plan(
            request_id=request_id,
            subject_ref=subject_ref,
            tenant=subject.tenant,
            home_region=home,
            policy=self.pack.label,
            datamap_digest=self.datamap_digest,
            regions=by_region(steps),
            approval_required=bool(reason),
            approval_reason=reason,
            deadline_months=self.pack.erasure.deadline_months,
            max_extension_months=self.pack.erasure.max_extension_months,
            window=self.pack.erasure.window_length,
            # In whole days, rounded up ("within this many days"), for older readers.
            window_days=-(-self.pack.erasure.window_length // timedelta(days=1)),
            window_ends_after_deadline=self.pack.erasure.window_may_end_after_deadline is not None,
            window_note=self._window_note(),
        )

    def _window_note(self) -> str:
        """What the plan says about its window and the deadline ("" when nothing to say)."""
        erasure = self.pack.erasure
        window = erasure.window_length
        shortest = shortest_months(erasure.deadline_months)
        longer = window > shortest
        if erasure.window_may_end_after_deadline:
            when = (
                f"it can outlast the deadline (as short as {shortest.days} days)"
                if longer
                else "when the erasure starts late"
            )
            return (
                f"the {format_duration(window)} window may end after the "
                f"{erasure.deadline_months}-month deadline, {when}: "
                f"{erasure.window_may_end_after_deadline}"
            )
        if longer:
            return (
                "the window ends at the deadline when that comes first: "
                f"{format_duration(window)} can outlast {erasure.deadline_months} month(s) "
                f"(as short as {shortest.days} days)"
            )
        return ""

    def _steps(self, system: System, held: set[str], tenant: str) -> list[Step]:
        """The steps of one system; whole backups only of systems that hold the subject.

        Retention rules scoped by tenant (`where: {tenant: [...]}`) apply to the subject's
        tenant; an obligation scoped by anything else is assumed to apply (kept: the safe side).
        """
        region = system.region
        scope = {"tenant": tenant}

        def step(index: int, **fields: object) -> Step:
            return Step(
                id=f"{system.name}/{index}",
                system=system.name,
                kind=system.kind,
                region=region,
                connection=system.connection,
                phase="deferred" if system.kind in DEFERRED_KINDS else "immediate",
                **fields,
            )

        if isinstance(system, SqlSystem):
            steps = []
            for index, table in enumerate(system.tables):
                by_column = {
                    c: decide(self.pack, k, region, scope) for c, k in table.columns.items()
                }
                action, kept, used = sql_action(system.name, table, by_column)
                steps.append(
                    step(index, locator=table, action=action, keep_columns=kept, decisions=used)
                )
            return steps
        steps = []
        for index, locator in enumerate(_locators(system)):
            if isinstance(locator, BlobBackupLocator) and (
                locator.backup_of is not None and locator.backup_of not in held
            ):
                continue
            decisions = [decide(self.pack, key, region, scope) for key in locator.categories]
            removal = locator.removal if isinstance(locator, KafkaTopicLocator) else None
            action, used = locator_action(
                system.kind, None, decisions, where=f"{system.name}/{index}", removal=removal
            )
            steps.append(step(index, locator=locator, action=action, decisions=used))
        return steps

    @staticmethod
    def _check_identities(steps: list[Step], values: dict[str, str]) -> None:
        """Every template a destructive step uses must be fillable from the request."""
        for step in steps:
            if step.action == "retain":
                continue
            for template in _templates(step):
                missing = [f for f in template_fields(template) if f not in values]
                if missing:
                    raise PlanningFailed(
                        f"step {step.id} needs {', '.join('{' + m + '}' for m in missing)}: "
                        "give it with --identity NAME=VALUE"
                    )


def needed_identities(steps: Iterable[Step]) -> set[str]:
    """The identities (`email`, ...) the destructive steps' templates need of every subject."""
    return {
        name.removeprefix("identity.")
        for step in steps
        if step.action != "retain"
        for template in _templates(step)
        for name in template_fields(template)
        if name.startswith("identity.")
    }


def _shredded_topics(steps: list[Step], held: set[str], tenant: str) -> list[Step]:
    """Topics erased by crypto-shredding become part of their keys system's shred step, which
    lists them: destroying the subject's keys is what erases them, so no Kafka step runs."""
    covered: dict[str, list[tuple[str, str]]] = {}
    rest: list[Step] = []
    for step in steps:
        locator = step.locator
        if isinstance(locator, KafkaTopicLocator) and step.action == "shred":
            assert locator.shredded_by is not None  # the data map requires it
            covered.setdefault(locator.shredded_by, []).append((step.id, locator.topic))
        else:
            rest.append(step)
    for keys, topics in covered.items():
        at = next((i for i, step in enumerate(rest) if step.system == keys), None)
        if at is None:
            why = (
                "which this request leaves out (--system)"
                if keys in held
                else f"which holds no keys of tenant {tenant!r}"
            )
            raise PlanningFailed(
                f"{topics[0][0]} is erased by crypto-shredding in keys system {keys}, {why}: "
                "nothing would erase it"
            )
        what = [
            f"{step_id}: Kafka topic {topic!r}, encrypted under the subject's keys"
            for step_id, topic in topics
        ]
        rest[at] = rest[at].model_copy(update={"covers": [*rest[at].covers, *what]})
    return rest


def _locators(
    system: KafkaSystem | RedisSystem | BlobSystem | LogsSystem | KeysSystem,
) -> Sequence[KafkaTopicLocator | RedisLocator | BlobBackupLocator | LogLocator | KeysLocator]:
    if isinstance(system, KeysSystem):
        return [system.locator]
    if isinstance(system, KafkaSystem):
        return system.topics
    if isinstance(system, RedisSystem):
        return system.keys
    if isinstance(system, BlobSystem):
        return system.backups
    return system.logs


def _templates(step: Step) -> list[str]:
    locator = step.locator
    found: list[str] = []
    for name in ("key_template", "subject_prefix"):
        value = getattr(locator, name, None)
        if isinstance(value, str):
            found.append(value)
    if isinstance(locator, KafkaTopicLocator) and locator.value_field is not None:
        found.append(locator.value_template)
    found += list(getattr(locator, "patterns", []))
    found += [h.field for h in getattr(locator, "hash_fields", [])]
    found += [h.key for h in getattr(locator, "hash_fields", [])]
    return found


def by_region(steps: Iterable[Step]) -> list[RegionPlan]:
    """Steps grouped by their system's region, regions in name order."""
    grouped: dict[str, list[Step]] = defaultdict(list)
    for step in steps:
        grouped[step.region].append(step)
    return [RegionPlan(region=region, steps=grouped[region]) for region in sorted(grouped)]
