"""`lethe hold place|release|list`: legal holds that stop destruction in their scope."""

from __future__ import annotations

import json as jsonlib
from typing import Annotated

import typer

from lethe.classification.taxonomy import UnknownCategory, category
from lethe.cli.common import ByOption, JsonOption, actor, err, out, run
from lethe.cli.views import holds_table
from lethe.contracts import HoldScope
from lethe.sdk.client import Client

hold_app = typer.Typer(help="Legal holds: place, release, list.", no_args_is_help=True)


@hold_app.command("place")
def place(
    matter: Annotated[str, typer.Option(help="the matter, e.g. a case name")],
    scope: Annotated[str, typer.Option(help="subject, tenant, system or category")],
    reason: Annotated[str, typer.Option(help="why (recorded)")],
    value: Annotated[
        str | None, typer.Option(help="the tenant, system or category (not for subject)")
    ] = None,
    tenant: Annotated[
        str | None,
        typer.Option(
            help="the tenant the hold is for (needed for a subject hold; a system or category "
            "hold without it holds for every tenant)"
        ),
    ] = None,
    subject: Annotated[str | None, typer.Option(help="for a subject hold (never stored)")] = None,
    by: ByOption = "",
) -> None:
    """Place a legal hold; erasure steps in its scope wait until it is released."""
    if scope not in ("subject", "tenant", "system", "category"):
        raise typer.BadParameter("--scope is subject, tenant, system or category")
    if scope == "subject" and not (tenant and subject):
        raise typer.BadParameter("a subject hold needs --tenant and --subject")
    if scope != "subject" and not value:
        raise typer.BadParameter(f"a {scope} hold needs --value")
    if scope == "tenant" and tenant and tenant != value:
        raise typer.BadParameter(
            "a tenant hold is for its --value; --tenant, if given, is the same"
        )
    if scope == "category" and value:
        try:
            category(value)
        except UnknownCategory as exc:
            raise typer.BadParameter(str(exc)) from None
    run(_place(matter, scope, value, tenant, subject, reason, actor(by)))  # type: ignore[arg-type]


async def _place(
    matter: str,
    scope: HoldScope,
    value: str | None,
    tenant: str | None,
    subject: str | None,
    reason: str,
    by: str,
) -> int:
    client = await Client.connect()
    if scope == "subject":
        assert tenant and subject
        value = client.subject_ref(tenant, subject)
    assert value is not None
    hold = await client.place_hold(
        matter=matter, scope=scope, value=value, placed_by=by, reason=reason, tenant=tenant
    )
    out.print(hold.id)
    err.print(f"placed {hold.id} on {scope} {value} for {hold.tenant or 'every tenant'}")
    return 0


@hold_app.command("release")
def release(
    hold_id: Annotated[str, typer.Argument(help="the hold's id (hold-...)")],
    by: ByOption = "",
) -> None:
    """Release a hold; erasures waiting on it resume."""
    run(_release(hold_id, actor(by)))


async def _release(hold_id: str, by: str) -> int:
    client = await Client.connect()
    hold = await client.release_hold(hold_id, released_by=by)
    err.print(f"released {hold.id} ({hold.matter})")
    return 0


@hold_app.command("list")
def list_holds(
    all_holds: Annotated[bool, typer.Option("--all", help="include released holds")] = False,
    tenant: Annotated[
        str | None, typer.Option(help="only the holds placed for this tenant")
    ] = None,
    json: JsonOption = False,
) -> None:
    """List legal holds."""
    run(_list(all_holds, tenant, json))


async def _list(all_holds: bool, tenant: str | None, json: bool) -> int:
    client = await Client.connect()
    found = await client.list_holds(include_released=all_holds, tenant=tenant)
    if json:
        out.print_json(jsonlib.dumps([h.model_dump(mode="json") for h in found]))
    else:
        out.print(holds_table(found))
    return 0
