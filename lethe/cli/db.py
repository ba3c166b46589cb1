"""`lethe db upgrade|status|grant-api`: Lethe's store and the key store at the schema this Lethe
needs, and the API's role's rights on the store."""

from __future__ import annotations

import json as jsonlib
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table
from sqlalchemy.engine import make_url

from lethe.cli.common import JsonOption, err, out, run
from lethe.evidence import api_role, store
from lethe.kernel import database
from lethe.kernel.config import Settings, load_settings
from lethe.kernel.migrations import Schema, SchemaStatus
from lethe.keys import store as key_store

db_app = typer.Typer(
    help="Lethe's own schemas (its store, the key store): where they stand, and upgrades.",
    no_args_is_help=True,
)

StoreOption = Annotated[
    bool, typer.Option("--store", help="Lethe's store only (ledger, holds, forget-list)")
]
KeysOption = Annotated[
    bool, typer.Option("--keys", help="the key store only (LETHE_KEYS_STORE_URL, else the store)")
]

_STATES = {
    "current": "up to date",
    "behind": "behind: `lethe db upgrade` brings it to the head",
    "empty": "no tables yet: `lethe db upgrade` makes them",
    "unversioned": "made before migrations: `lethe db upgrade` adopts it",
    "foreign": "not as Lethe makes it",
}


def _chosen(settings: Settings, only_store: bool, only_keys: bool) -> list[tuple[Schema, str]]:
    """The schemas a command is about, each with its database: both unless one is named."""
    both = only_store == only_keys
    chosen = []
    if both or only_store:
        chosen.append((store.schema, settings.store_url.get_secret_value()))
    if both or only_keys:
        chosen.append((key_store.schema, settings.key_store_url))
    return chosen


@db_app.command("upgrade")
def upgrade(only_store: StoreOption = False, only_keys: KeysOption = False) -> None:
    """Bring Lethe's store and the key store (or the one named) to their heads.

    Tables made before migrations are adopted; tables Lethe did not make are refused.
    """
    run(_upgrade(only_store, only_keys))


async def _upgrade(only_store: bool, only_keys: bool) -> int:
    settings = load_settings()
    for schema, url in _chosen(settings, only_store, only_keys):
        done = await database.upgrade_schema(url, schema)
        before = done.from_revision or "none"
        if done.adopted:
            before = f"none (tables made before migrations, adopted as {schema.baseline})"
        if done.from_revision == done.to_revision:
            out.print(f"{done.name}: at {done.to_revision}, the head; nothing to do")
        else:
            out.print(f"{done.name}: upgraded from {before} to {done.to_revision}")
    return 0


@db_app.command("status")
def status(
    only_store: StoreOption = False, only_keys: KeysOption = False, json: JsonOption = False
) -> None:
    """Each schema's revision beside the head this Lethe needs; exits 1 when one is behind.

    Reads only: nothing is made or changed.
    """
    run(_status(only_store, only_keys, json))


async def _status(only_store: bool, only_keys: bool, json: bool) -> int:
    settings = load_settings()
    found: list[SchemaStatus] = []
    for schema, url in _chosen(settings, only_store, only_keys):
        found.append(await database.schema_status(url, schema))
    if json:
        out.print_json(jsonlib.dumps([f.model_dump(mode="json") for f in found]))
    else:
        table = Table(title="Lethe's schemas", title_justify="left")
        for column in ("schema", "revision", "head", "state"):
            table.add_column(column)
        for f in found:
            state = _STATES[f.state]
            if f.problems:
                state += ": " + "; ".join(f.problems)
            table.add_row(f.name, f.revision or "none", f.head, escape(state))
        out.print(table)
    behind = [f for f in found if f.state != "current"]
    if behind and not json:
        err.print(f"{len(behind)} of {len(found)} not at the head", highlight=False)
    return 1 if behind else 0


@db_app.command("grant-api")
def grant_api(
    role: Annotated[str, typer.Argument(help="the API's PostgreSQL role (made by you first)")],
) -> None:
    """Grant the API's role its rights on Lethe's store (PostgreSQL only).

    It reads every table and writes the ledger, legal holds and API tokens; row-level security
    keeps each tenant to its rows. Make the role first, without BYPASSRLS:
    CREATE ROLE lethe_api LOGIN PASSWORD '...' NOBYPASSRLS
    """
    run(_grant_api(role))


async def _grant_api(role: str) -> int:
    url = load_settings().store_url.get_secret_value()
    api_role.check_dialect(make_url(url).get_backend_name())
    engine = await store.engine_for(url)
    async with engine.begin() as conn:
        granted = await api_role.grant_api(conn, role)
    for statement in granted:
        out.print(escape(statement), highlight=False)
    err.print(
        f"{role[:63]} may now read Lethe's store, row-level security applied", highlight=False
    )
    return 0
