"""Readable renderings of plans, statuses, certificates and holds (rich tables)."""

from __future__ import annotations

from datetime import datetime

from rich.console import Group
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


def when(moment: datetime | None) -> str:
    """A moment as `YYYY-MM-DD HH:MM UTC`."""
    return moment.strftime("%Y-%m-%d %H:%M UTC") if moment else "-"


def plan_table(plan: Plan) -> Table:
    """The plan: per region, per step, the action and the rules behind it."""
    table = Table(
        title=f"plan under {plan.policy} (home region {plan.home_region})", title_justify="left"
    )
    for column in ("region", "step", "kind", "action", "phase", "basis"):
        table.add_column(column)
    for region in plan.regions:
        for step in region.steps:
            basis = ", ".join(sorted({d.rule for d in step.decisions}))
            action = step.action + (
                f" keep {','.join(step.keep_columns)}" if step.keep_columns else ""
            )
            if step.covers:
                action += "".join(f"\n  and {covered}" for covered in step.covers)
            table.add_row(region.region, step.id, step.kind, action, step.phase, basis)
    citations = {d.rule: d.exception or d.citation for s in plan.steps for d in s.decisions}
    table.caption = "; ".join(f"{rule}: {why}" for rule, why in sorted(citations.items()))
    table.caption_justify = "left"
    return table


def preflight_view(checks: list[StepCheck]) -> Table:
    """What the preflight found, step by step."""
    table = Table(title="preflight (nothing touched)", title_justify="left")
    for column in ("step", "result", "problems"):
        table.add_column(column)
    for check in checks:
        result = Text("ready", style="green") if check.ready else Text("problem", style="red")
        kind = " (may clear by itself; retried)" if check.transient else ""
        table.add_row(check.step_id, result, "; ".join(check.problems) + kind)
    return table


def status_view(status: ErasureStatus) -> Group:
    """The status: state, deadline, approval, preflight problems and each step."""
    head = Text.assemble(
        (f"{status.state}", "bold"),
        f"  received {when(status.received_at)}  deadline {when(status.deadline)}",
        (" OVERDUE" if status.overdue else "", "bold red"),
    )
    if status.extension:
        head.append(f"  extended {status.extension.months} month(s): {status.extension.reason}")
    if status.window_ends_at:
        head.append(f"  window ends {when(status.window_ends_at)}")
    table = Table(show_header=True)
    for column in ("step", "kind", "region", "action", "phase", "status", "detail"):
        table.add_column(column)
    for step in status.steps:
        detail = step.detail or (f"held by {', '.join(step.holds)}" if step.holds else "")
        if step.last_failure:
            detail = (
                f"attempt {step.attempt} failed: {step.last_failure}; next attempt "
                f"{when(step.next_attempt_at)}"
            )
        table.add_row(
            step.step_id,
            step.kind,
            step.region,
            step.action,
            step.phase,
            Text(step.status, style=STATUS_STYLE.get(step.status, "")),
            detail,
        )
    if status.preflight:
        head.append(f"  preflight again {when(status.next_preflight_at)}")
        return Group(head, preflight_view(status.preflight), table)
    return Group(head, table)


def _evidence_value(value: object) -> str:
    """An evidence value as tables show it: a long opaque token (a shred canary's ciphertext)
    abbreviated, text whole; the JSON certificate holds every value whole."""
    text = str(value)
    if len(text) <= 48 or any(c.isspace() for c in text):
        return text
    return f"{text[:12]}...({len(text)} chars)"


def _outcome_row(outcome: StepOutcome) -> list[str | Text]:
    evidence = ", ".join(f"{k}={_evidence_value(v)}" for k, v in sorted(outcome.evidence.items()))
    return [
        outcome.step_id,
        Text(outcome.status, style=STATUS_STYLE.get(outcome.status, "")),
        str(outcome.affected),
        "yes" if outcome.verified else "no",
        when(outcome.gone_by) if outcome.gone_by else "",
        # The whole evidence, on its own line: it is what the certificate certifies.
        "\n".join(part for part in (outcome.detail[:300], evidence) if part),
    ]


def certificate_view(certificate: Certificate) -> Group:
    """The certificate in a readable form."""
    head = Table(show_header=False, title="erasure certificate", title_justify="left")
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
        rows.append(
            (
                "extension",
                f"{certificate.extension.months} month(s): {certificate.extension.reason}",
            )
        )
    for key, value in rows:
        head.add_row(key, value)
    summary = certificate.summary()
    head.title = f"erasure certificate: {summary[0]}"
    for line in summary[1:]:
        head.add_row("", Text(line, style="red" if line.startswith("failed") else "yellow"))
    steps = Table(title="steps", title_justify="left")
    for column in ("step", "status", "affected", "verified", "gone by", "evidence"):
        steps.add_column(column)
    for outcome in certificate.steps:
        steps.add_row(*_outcome_row(outcome))
    return Group(head, steps)


def holds_table(found: list[Hold]) -> Table:
    """Legal holds."""
    table = Table(title="legal holds", title_justify="left")
    for column in ("id", "matter", "scope", "value", "placed by", "placed", "released"):
        table.add_column(column)
    for hold in found:
        released = (
            f"{when(hold.released_at)} by {hold.released_by}" if hold.released_at else "active"
        )
        table.add_row(
            hold.id,
            hold.matter,
            hold.scope,
            hold.value,
            hold.placed_by,
            when(hold.placed_at),
            released,
        )
    return table
