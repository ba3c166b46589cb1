"""The terminal's views at 80 columns: plans, statuses, certificates, and progress as it happens.

Rendered by rich into a string as a terminal of 80 columns would show them: no line wider than
the screen, prose below tables instead of in a one-word column, evidence only when asked for.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console, RenderableType

from lethe.cli.erasure import Watch
from lethe.cli.views import (
    EVIDENCE_HINT,
    certificate_view,
    changes,
    holds_table,
    plan_table,
    status_view,
)
from lethe.contracts import (
    Certificate,
    ErasureRequest,
    ErasureStatus,
    Hold,
    Plan,
    StepCheck,
    StepOutcome,
    StepProgress,
    Subject,
)
from lethe.plans.planner import Planner
from lethe.policies.model import PACKS_DIR

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 12, 8, 3, 0, tzinfo=UTC)
DETAIL = "soft-deleted the subject's rows in patients: cleared full_name, email, phone"


def _render(renderable: RenderableType, width: int = 80) -> list[str]:
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    console.print(renderable)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(text, str)
    return text.splitlines()


def _plan() -> Plan:
    """The sample hospital's plan: every kind of system (SQL, Kafka, Redis, blob, logs)."""
    planner = Planner.from_files(ROOT / "examples" / "datamap.yaml", PACKS_DIR / "gdpr.yaml")
    request = ErasureRequest(
        subject=Subject(tenant="st-mary", subject_id="p-1", identities={"email": "a@b.org"}),
        requested_by="dpo",
    )
    return planner.plan(request, "req-1", "0" * 32)


def _step(n: int, status: str = "planned", **more: object) -> StepProgress:
    return StepProgress.model_validate(
        {
            "step_id": f"patients-db/{n}",
            "system": "patients-db",
            "kind": "sql",
            "region": "eu",
            "action": "soft_delete",
            "phase": "immediate",
            "status": status,
            **more,
        }
    )


def _status(state: str, *steps: StepProgress, **more: object) -> ErasureStatus:
    return ErasureStatus.model_validate(
        {
            "request_id": "req-1",
            "subject_ref": "0" * 32,
            "state": state,
            "received_at": NOW,
            "deadline": NOW + timedelta(days=31),
            "steps": list(steps),
            **more,
        }
    )


def _certificate() -> Certificate:
    plan = _plan()
    outcomes = [
        StepOutcome(
            step_id=step.id,
            status="done",
            affected=1,
            verified=True,
            evidence={"rows_changed": 1, "canary": "x" * 60},
            detail=DETAIL,
        )
        for step in plan.steps
    ]
    return Certificate(
        request_id="req-1",
        subject_ref="0" * 32,
        tenant="st-mary",
        outcome="erased",
        policy=plan.policy,
        datamap_digest="f" * 64,
        requested_by="dpo",
        reason="",
        received_at=NOW,
        deadline=NOW + timedelta(days=31),
        completed_at=NOW,
        plan=plan,
        steps=outcomes,
    )


def _fits(lines: list[str]) -> None:
    too_wide = [line for line in lines if len(line) > 80]
    assert not too_wide, "\n".join(too_wide)


def test_the_plan_of_every_kind_fits_80_columns_with_each_rule_whole() -> None:
    plan = _plan()
    assert {step.kind for step in plan.steps} >= {"sql", "kafka", "redis", "blob", "logs"}
    lines = _render(plan_table(plan))
    _fits(lines)
    rows = "\n".join(line for line in lines if line.startswith("│"))
    for rule in {d.rule for step in plan.steps for d in step.decisions}:
        assert f" {rule} " in rows  # one rule per line, whole: never cut into pieces
    for step in plan.steps:
        assert f"│ {step.id} " in rows


def test_a_status_shows_steps_without_their_detail_unless_verbose() -> None:
    done = _status("completed", _step(0, "done", detail=DETAIL), _step(1, "done"))
    quiet, verbose = _render(status_view(done)), _render(status_view(done, verbose=True))
    _fits(quiet + verbose)
    assert "cleared full_name" not in "\n".join(quiet)
    assert "cleared full_name" in "\n".join(verbose)
    # The detail is prose under the table, on lines of its own: not inside a column.
    line = next(line for line in verbose if "cleared full_name" in line)
    assert "│" not in line and line.startswith("patients-db/0")


def test_a_failure_and_a_preflight_problem_are_shown_without_verbose() -> None:
    failing = _step(0, "running", attempt=2, last_failure="OperationalError: connection refused")
    problem = StepCheck(step_id="patients-db/1", problems=["SchemaMismatch: no phone_number_2"])
    lines = _render(status_view(_status("erasing", failing, preflight=[problem])))
    _fits(lines)
    shown = "\n".join(lines)
    assert "attempt 2 failed: OperationalError: connection refused" in shown
    assert "phone_number_2" in shown  # whole, on a line of its own, below the table


def test_changes_are_one_line_each() -> None:
    planned = _status("awaiting_approval", _step(0), _step(1))
    first = changes(None, planned)
    assert first == [
        "awaiting_approval: 2 planned (of 2 steps)",
        "  patients-db/0 soft_delete: planned",
        "  patients-db/1 soft_delete: planned",
    ]
    assert changes(planned, planned) == []
    running = _status("erasing", _step(0, "done"), _step(1))
    assert changes(planned, running) == [
        "erasing: 1 done, 1 planned (of 2 steps)",
        "  patients-db/0 soft_delete: done",
    ]
    assert changes(running, _status("erasing", _step(0, "done"), _step(1, "running"))) == [
        "  patients-db/1 soft_delete: running"
    ]
    assert changes(None, _status("planning")) == ["planning"]


def test_the_certificate_keeps_evidence_behind_verbose() -> None:
    certificate = _certificate()
    quiet = _render(certificate_view(certificate))
    verbose = _render(certificate_view(certificate, verbose=True))
    _fits(quiet + verbose)
    assert "rows_changed" not in "\n".join(quiet)
    assert EVIDENCE_HINT.split(":")[0] in "\n".join(quiet)
    shown = "\n".join(verbose)
    assert "rows_changed=1" in shown and "cleared full_name" in shown
    assert "x" * 60 not in shown and "xxxxxxxxxxxx...(60 chars)" in shown
    assert "f" * 56 in shown  # the data map's digest folded, not cut


def _watched(terminal: bool, keep: bool) -> str:
    file = io.StringIO()
    console = Console(file=file, width=80, force_terminal=terminal, color_system=None)
    with Watch(keep=keep, console=console) as watch:
        watch.show(_status("awaiting_approval", _step(0), _step(1)))
        watch.say("approval required: special-category data\napproving as demo-dpo")
        watch.show(_status("erasing", _step(0, "done"), _step(1)))
        watch.show(_status("erasing", _step(0, "done"), _step(1)))
        watch.show(_status("completed", _step(0, "done"), _step(1, "done")))
    return file.getvalue()


def test_progress_is_one_line_per_change_when_not_a_terminal() -> None:
    shown = _watched(terminal=False, keep=False)
    assert shown.splitlines() == [
        "awaiting_approval: 2 planned (of 2 steps)",
        "  patients-db/0 soft_delete: planned",
        "  patients-db/1 soft_delete: planned",
        "approval required: special-category data",
        "approving as demo-dpo",
        "erasing: 1 done, 1 planned (of 2 steps)",
        "  patients-db/0 soft_delete: done",
        "completed: 2 done (of 2 steps)",
        "  patients-db/1 soft_delete: done",
    ]
    kept = _watched(terminal=False, keep=True)
    assert kept.startswith(shown) and kept.count("┃ step") == 1  # the last status, once


def test_progress_is_drawn_in_place_on_a_terminal() -> None:
    shown = _watched(terminal=True, keep=True)
    assert "\x1b[" in shown  # cursor movement: the table is redrawn, not printed again
    assert "approval required: special-category data" in shown
    assert "awaiting_approval: 2 planned" not in shown  # no change lines on a terminal


def test_holds_fit_80_columns_with_each_value_whole() -> None:
    held = Hold(
        id="hold-d918272660e4",
        matter="a long-running litigation matter",
        scope="subject",
        value="0123456789abcdef" * 2,
        placed_by="dpo",
        placed_at=NOW,
        reason="pending claim",
    )
    released = held.model_copy(
        update={"id": "hold-aaaa", "released_at": NOW, "released_by": "counsel"}
    )
    lines = _render(holds_table([held, released]))
    _fits(lines)
    shown = "\n".join(lines)
    assert "0123456789abcdef" * 2 in shown  # a subject reference is never cut
    assert "released by counsel" in shown and "│ active" in shown
