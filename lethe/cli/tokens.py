"""`lethe tokens create|list|revoke`: API tokens for `lethe serve`, shown once, stored hashed."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

import typer
from rich.table import Table

from lethe.cli.common import ByOption, JsonOption, actor, err, out, run
from lethe.cli.views import when
from lethe.evidence import tokens
from lethe.evidence.store import engine_for
from lethe.kernel.config import load_settings

tokens_app = typer.Typer(
    help="API tokens for `lethe serve`: create (shown once), list, revoke.", no_args_is_help=True
)


@tokens_app.command("create")
def create(
    role: Annotated[str, typer.Option(help=f"one of: {', '.join(tokens.ROLES)}")],
    tenant: Annotated[
        str | None, typer.Option(help="the tenant it acts for (dpo and service: required)")
    ] = None,
    name: Annotated[str, typer.Option(help="what the token is for (shown in the ledger)")] = "",
    days: Annotated[int, typer.Option(help="days until it expires (1 to 366)")] = 90,
    by: ByOption = "",
) -> None:
    """Create a token and print it once: keep it, it cannot be shown again."""
    run(_create(role, tenant, name or f"{role}@{tenant or 'all'}", days, actor(by)))


async def _create(role: str, tenant: str | None, name: str, days: int, by: str) -> int:
    tokens.check_grant(role, tenant, timedelta(days=days))
    store = await engine_for(load_settings().store_url.get_secret_value())
    token, secret = await tokens.create(
        store, name=name, role=role, tenant=tenant, lifetime=timedelta(days=days), created_by=by
    )
    out.print(secret, highlight=False, soft_wrap=True)
    err.print(
        f"created {token.id} ({token.role} for {token.tenant or 'all tenants'}), expires "
        f"{when(token.expires_at)}; it is shown this once: send it as "
        "`Authorization: Bearer <token>` or paste it into the console's sign-in",
        highlight=False,
    )
    return 0


@tokens_app.command("list")
def list_tokens(
    include_revoked: Annotated[bool, typer.Option(help="also revoked tokens")] = False,
    json: JsonOption = False,
) -> None:
    """List tokens (never their secrets)."""
    run(_list(include_revoked, json))


async def _list(include_revoked: bool, json: bool) -> int:
    store = await engine_for(load_settings().store_url.get_secret_value())
    found = await tokens.list_tokens(store, include_revoked=include_revoked)
    if json:
        out.print_json(data=[token.model_dump(mode="json") for token in found])
        return 0
    table = Table(title="API tokens", title_justify="left")
    for column in ("id", "name", "role", "tenant", "expires", "last used", "revoked"):
        table.add_column(column, overflow="fold")
    for token in found:
        table.add_row(
            token.id,
            token.name,
            token.role,
            token.tenant or "all",
            when(token.expires_at),
            when(token.last_used_at),
            when(token.revoked_at),
        )
    out.print(table)
    return 0


@tokens_app.command("revoke")
def revoke(
    token_id: Annotated[str, typer.Argument(help="the token's id (tok_...)")],
    by: ByOption = "",
) -> None:
    """Revoke a token: it stops working at once."""
    run(_revoke(token_id, actor(by)))


async def _revoke(token_id: str, by: str) -> int:
    store = await engine_for(load_settings().store_url.get_secret_value())
    token = await tokens.revoke(store, token_id, by=by)
    err.print(f"revoked {token.id} ({token.name})", highlight=False)
    return 0
