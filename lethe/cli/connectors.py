"""`lethe connectors`: what each connector is and can do, as its code describes it."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from lethe.activities.connector import ConnectorInfo
from lethe.activities.connectors import describe
from lethe.cli.common import JsonOption, out

MARKDOWN_COLUMNS = (
    "kind",
    "locator",
    "actions",
    "phase",
    "preflight checks",
    "verify proves",
    "a batch of subjects",
    "retention sweep",
)


def markdown(infos: list[ConnectorInfo]) -> str:
    """The connectors as a Markdown table (the README's, kept equal by a test)."""
    rows = [
        "| " + " | ".join(MARKDOWN_COLUMNS) + " |",
        "|" + "---|" * len(MARKDOWN_COLUMNS),
    ]
    for info in infos:
        cells = (
            f"`{info.kind}`",
            f"`{info.locator}`",
            ", ".join(info.actions),
            info.phase,
            info.preflight,
            info.verify,
            info.batching,
            info.sweep,
        )
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _table(info: ConnectorInfo) -> Table:
    table = Table(title=f"{info.kind}: {info.connector}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("does", info.summary)
    table.add_row("locator", f"{info.locator} ({', '.join(info.locator_fields)})")
    table.add_row("actions", ", ".join(info.actions))
    table.add_row("phase", info.phase)
    table.add_row("a batch of subjects", info.batching)
    table.add_row("preflight checks", info.preflight)
    table.add_row("verify proves", info.verify)
    table.add_row("after a lost worker", info.retry)
    table.add_row("retention sweep", info.sweep)
    return table


def register(app: typer.Typer) -> None:
    """Add `lethe connectors` to the CLI."""

    @app.command()
    def connectors(
        as_json: JsonOption = False,
        as_markdown: Annotated[
            bool, typer.Option("--markdown", help="print the README's Markdown table")
        ] = False,
    ) -> None:
        """List the connectors: each kind of system, its locator, actions and guarantees."""
        infos = describe()
        if as_json:
            print(json.dumps([i.model_dump(mode="json") for i in infos], indent=2))
        elif as_markdown:
            print(markdown(infos), end="")
        else:
            for info in infos:
                out.print(_table(info))
