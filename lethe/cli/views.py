"""Readable renderings of plans, statuses, certificates and holds (rich), at 80 columns too.

Tables hold short values only (ids, kinds, actions, statuses, counts); anything that is prose
(a step's detail, evidence, a rule's citation, a preflight problem) goes on lines below its
table, one per step, where it wraps at word boundaries instead of into a one-word column.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from lethe.contracts import Certificate, ErasureStatus, Hold, Plan, StepCheck, StepOutcome

STATUS_STYLE = {
    "done": "green",
    "retained": "cyan",
    "running": "yellow",
    "held": "magenta",
    "pending_compaction": "yellow",
    "at_risk": "red",
    "failed": "red",
    "planned": "dim",
}
EVIDENCE_HINT = "each step's evidence: add --verbose, or see the certificate as JSON (--json)"
"""What a certificate shown without its evidence says about where the evidence is."""


def when(moment: datetime | None) -> str:
    """A moment as `YYYY-MM-DD HH:MM UTC`."""
    return moment.strftime("%Y-%m-%d %H:%M UTC") if moment else "-"


def notes(rows: Iterable[tuple[str, str | Text]], title: str = "") -> Table:
    """Prose under a table: a key on the left, text wrapping at word boundaries on the right."""
    grid = Table.grid(padding=(0, 1))
    if title:
        grid.title, grid.title_justify = title, "left"
    grid.add_column(no_wrap=True, style="bold")
    grid.add_column(overflow="fold")
    for key, text in rows:
        grid.add_row(key, text)
    return grid


def _steps_table(title: str = "") -> Table:
    """A table of steps whose id column never wraps mid-id unless it must."""
    table = Table(title=title or None, title_justify="left")
    table.add_column("step", overflow="fold")
    return table


def plan_table(plan: Plan) -> Group:
    """The plan: per step, the action (and its phase when deferred) and the rules behind it;
    then each rule's citation."""
    regions = len(plan.regions) > 1
    table = _steps_table(f"plan under {plan.policy} (home region {plan.home_region})")
    if regions:
        table.add_column("region")
    for column in ("kind", "action"):
        table.add_column(column)
    table.add_column("basis", overflow="fold")
    for region in plan.regions:
        for step in region.steps:
            action = step.action + (
                f" keep {','.join(step.keep_columns)}" if step.keep_columns else ""
            )
            action += "\n(deferred)" if step.phase == "deferred" else ""
            action += "".join(f"\n and {covered}" for covered in step.covers)
            basis = "\n".join(sorted({d.rule for d in step.decisions}))
            row = [step.id, *([region.region] if regions else []), step.kind, action]
            table.add_row(*row, basis)
    citations = {d.rule: d.exception or d.citation for s in plan.steps for d in s.decisions}
    rows: list[tuple[str, str | Text]] = sorted(citations.items())
    if any(step.phase == "deferred" for step in plan.steps):
        window = f"within the window of {_duration(plan.window_length)}"
        rows.append(("(deferred)", f"after the immediate steps, {window} (backups, logs)"))
    return Group(table, notes(rows))


def _duration(length: timedelta) -> str:
    """A length as a person says it: `30 days`, `12 hours`, `30 seconds`."""
    seconds = int(length.total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size} {unit}{'s' if seconds != size else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


def preflight_view(checks: list[StepCheck]) -> Group:
    """What the preflight found, step by step; each problem on its own lines below."""
    table = _steps_table("preflight (nothing touched)")
    table.add_column("result")
    problems: list[tuple[str, str | Text]] = []
    for check in checks:
        result = Text("ready", style="green") if check.ready else Text("problem", style="red")
        table.add_row(check.step_id, result)
        kind = " (may clear by itself; retried)" if check.transient else ""
        problems += [(check.step_id, problem + kind) for problem in check.problems]
    return Group(table, notes(problems))


def status_head(status: ErasureStatus) -> Text:
    """The status's first lines: state, received, deadline; extension and window below."""
    head = Text.assemble(
        (status.state, "bold"),
        f"  received {when(status.received_at)}  deadline {when(status.deadline)}",
        (" OVERDUE" if status.overdue else "", "bold red"),
    )
    if status.extension:
        head.append(f"\nextended {status.extension.months} month(s): {status.extension.reason}")
    if status.window_ends_at:
        head.append(f"\nbackups and logs follow by {when(status.window_ends_at)}")
    if status.preflight:
        head.append(f"\npreflight again {when(status.next_preflight_at)}")
    return head


def _step_note(step_detail: str, holds: list[str], failure: str) -> str:
    """What a person should read about a step: its failure, else its holds, else its detail."""
    return failure or (f"held by {', '.join(holds)}" if holds else "") or step_detail


def status_view(status: ErasureStatus, *, verbose: bool = False) -> Group:
    """The status: the head lines, the preflight's problems, a table of steps, and below it
    each step's failure or hold (and, with `verbose`, what each step did)."""
    regions = len({step.region for step in status.steps}) > 1
    table = _steps_table()
    for column in ("kind", *(["region"] if regions else []), "action", "phase", "status"):
        table.add_column(column)
    below: list[tuple[str, str | Text]] = []
    for step in status.steps:
        table.add_row(
            step.step_id,
            step.kind,
            *([step.region] if regions else []),
            step.action,
            step.phase,
            Text(step.status, style=STATUS_STYLE.get(step.status, "")),
        )
        failure = (
            f"attempt {step.attempt} failed: {step.last_failure}; next attempt "
            f"{when(step.next_attempt_at)}"
            if step.last_failure
            else ""
        )
        note = _step_note(step.detail if verbose else "", step.holds, failure)
        if note:
            below.append((step.step_id, Text(note, style="red" if failure else "")))
    parts: list[RenderableType] = [status_head(status)]
    if status.preflight:
        parts.append(preflight_view(status.preflight))
    return Group(*parts, table, notes(below))


def changes(before: ErasureStatus | None, now: ErasureStatus) -> list[str]:
    """One line per change between two statuses: the request's state, then each step's status
    (for output that is not a terminal, where nothing can be redrawn in place)."""
    lines: list[str] = []
    if before is None or before.state != now.state:
        counts = _counts(now)
        lines.append(f"{now.state}: {counts} (of {len(now.steps)} steps)" if counts else now.state)
    seen = {step.step_id: step for step in before.steps} if before else {}
    for step in now.steps:
        was = seen.get(step.step_id)
        if was is None or (was.status, was.attempt) != (step.status, step.attempt):
            retry = f" (attempt {step.attempt})" if step.last_failure else ""
            lines.append(f"  {step.step_id} {step.action}: {step.status}{retry}")
    return lines


def _counts(status: ErasureStatus) -> str:
    """How many steps are in each status: `2 done, 2 planned`."""
    counted: dict[str, int] = {}
    for step in status.steps:
        counted[step.status] = counted.get(step.status, 0) + 1
    return ", ".join(f"{n} {state}" for state, n in counted.items())


def _evidence_value(value: object) -> str:
    """An evidence value as the terminal shows it: a long opaque token (a shred canary's
    ciphertext) abbreviated, text whole; the JSON certificate holds every value whole."""
    text = str(value)
    if len(text) <= 48 or any(c.isspace() for c in text):
        return text
    return f"{text[:12]}...({len(text)} chars)"


def evidence_text(outcome: StepOutcome) -> str:
    """A step's detail and evidence as prose: what the certificate certifies for the step."""
    evidence = ", ".join(f"{k}={_evidence_value(v)}" for k, v in sorted(outcome.evidence.items()))
    return "\n".join(part for part in (outcome.detail[:300], evidence) if part)


def _outcome_row(outcome: StepOutcome) -> list[str | Text]:
    return [
        outcome.step_id,
        Text(outcome.status, style=STATUS_STYLE.get(outcome.status, "")),
        str(outcome.affected),
        "yes" if outcome.verified else "no",
        when(outcome.gone_by) if outcome.gone_by else "",
    ]


def _certificate_head(certificate: Certificate) -> Table:
    head = Table(show_header=False, title_justify="left")
    head.add_column(no_wrap=True)
    head.add_column(overflow="fold")
    rows = [
        ("request", certificate.request_id),
        ("subject reference", certificate.subject_ref),
        ("tenant", certificate.tenant),
        ("outcome", certificate.outcome),
        ("policy", certificate.policy),
        ("data map sha256", certificate.datamap_digest),
        ("requested by", certificate.requested_by),
        ("reason", certificate.reason or "-"),
        ("received", when(certificate.received_at)),
        ("deadline", when(certificate.deadline)),
        ("approved by", certificate.approval.by if certificate.approval else "-"),
        ("started", when(certificate.started_at)),
        ("completed", when(certificate.completed_at)),
        ("ledger entries", str(len(certificate.ledger_hashes))),
    ]
    if certificate.extension:
        extension = certificate.extension
        rows.append(("extension", f"{extension.months} month(s): {extension.reason}"))
    for key, value in rows:
        head.add_row(key, value)
    summary = certificate.summary()
    head.title = f"erasure certificate: {summary[0]}"
    for line in summary[1:]:
        head.add_row("", Text(line, style="red" if line.startswith("failed") else "yellow"))
    return head


def certificate_view(
    certificate: Certificate, *, verbose: bool = False, hint: str = EVIDENCE_HINT
) -> Group:
    """The certificate: its head, a table of steps, and each step's evidence with `verbose`
    (else one line saying where the evidence is: `hint`)."""
    steps = _steps_table("steps")
    for column in ("status", "affected", "verified", "gone by"):
        steps.add_column(column)
    for outcome in certificate.steps:
        steps.add_row(*_outcome_row(outcome))
    if verbose:
        below = notes(((o.step_id, evidence_text(o)) for o in certificate.steps), "evidence")
        return Group(_certificate_head(certificate), steps, below)
    return Group(_certificate_head(certificate), steps, Text(hint, style="dim"))


def holds_table(found: list[Hold]) -> Group:
    """Legal holds: a table of short fields, then each hold's value and who placed (and
    released) it on lines below."""
    table = Table(title="legal holds", title_justify="left")
    table.add_column("id", no_wrap=True)
    table.add_column("matter", overflow="fold")
    for column in ("scope", "placed", "state"):
        table.add_column(column, no_wrap=True)
    below: list[tuple[str, str | Text]] = []
    for hold in found:
        state = "released" if hold.released_at else "active"
        table.add_row(hold.id, hold.matter, hold.scope, when(hold.placed_at)[:10], state)
        said = f"{hold.scope} {hold.value}; placed by {hold.placed_by} {when(hold.placed_at)}"
        if hold.released_at:
            said += f"; released by {hold.released_by} {when(hold.released_at)}"
        below.append((hold.id, said))
    return Group(table, notes(below))
