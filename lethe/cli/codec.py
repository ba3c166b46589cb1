"""`lethe codec ...`: the payload codec's keys on the key service, and new secrets and tokens."""

from __future__ import annotations

import base64
import os
import secrets
from typing import Annotated

import typer
from rich.table import Table

from lethe.cli.common import JsonOption, err, out, run
from lethe.codec.keys import CodecKeyRing
from lethe.kernel.config import SECRET_KEY_BYTES, Settings, load_settings
from lethe.kernel.errors import RotationConflict
from lethe.keys.store import key_engine
from lethe.temporal.codec_usage import open_workflow_key_usage
from lethe.temporal.connection import connect

VISIBILITY_LAG_SECONDS = 60.0

codec_app = typer.Typer(
    help="The payload codec's keys, and new secrets and codec-server tokens.",
    no_args_is_help=True,
)


def settle_seconds(settings: Settings) -> float:
    """How long a superseded key must wait before it retires: every process re-reads the ring
    within LETHE_KEYS_CACHE_SECONDS, and the server's workflow listing lags a little."""
    return settings.keys_cache_seconds + VISIBILITY_LAG_SECONDS


async def _ring() -> CodecKeyRing:
    settings = load_settings()
    return CodecKeyRing(await key_engine(settings.key_store_url), settings.keys_master_key_bytes)


@codec_app.command("rotate")
def rotate() -> None:
    """Make a new codec key current; older keys keep decrypting the histories they wrote."""

    async def go() -> int:
        key_id = await (await _ring()).rotate()
        out.print(
            f"codec key {key_id} is current; workers pick it up within LETHE_KEYS_CACHE_SECONDS",
            highlight=False,
        )
        return 0

    run(go())


@codec_app.command("keys")
def keys(
    usage: Annotated[
        bool, typer.Option("--usage", help="also count the open workflows that need each key")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """List the codec keys: current, live, retired (and, with --usage, who still needs them)."""

    async def go() -> int:
        infos = await (await _ring()).list()
        needed: dict[str, int] = {}
        if usage:
            found = await open_workflow_key_usage(await connect(load_settings()))
            needed = {key: len(ids) for key, ids in found.workflows_by_key.items()}
        if as_json:
            rows = [info.model_dump(mode="json") for info in infos]
            if usage:
                for row in rows:
                    row["open_workflows"] = needed.get(row["key_id"], 0)
            out.print_json(data=rows)
            return 0
        if not infos:
            out.print(
                "no codec key yet: the first worker or client makes one (or lethe codec rotate)"
            )
            return 0
        table = Table(title="Codec keys")
        for heading in ("key", "state", "created", *(["open workflows"] if usage else [])):
            table.add_column(heading)
        for info in infos:
            state = "retired" if info.retired_at else ("current" if info.current else "live")
            cells = [info.key_id, state, f"{info.created_at:%Y-%m-%d %H:%M}"]
            table.add_row(*cells, *([str(needed.get(info.key_id, 0))] if usage else []))
        out.print(table)
        return 0

    run(go())


@codec_app.command("retire")
def retire(
    key_id: Annotated[str, typer.Argument(help="the codec key to destroy")],
    yes: Annotated[
        bool,
        typer.Option("--yes", help="confirm: closed histories under this key become unreadable"),
    ] = False,
) -> None:
    """Destroy a codec key once no open workflow's history needs it."""

    async def go() -> int:
        ring = await _ring()
        info = {info.key_id: info for info in await ring.list()}.get(key_id)
        if info is not None and info.retired_at is not None:
            out.print(f"codec key {key_id} was already retired", highlight=False)
            return 0
        if info is None or info.current:
            await ring.retire(key_id)  # refuses, naming the problem
        client = await connect(load_settings())

        def progress(scanned: int) -> None:
            if scanned % 100 == 0:
                err.print(f"checked {scanned} open workflows", highlight=False)

        usage = await open_workflow_key_usage(client, progress)
        users = usage.users_of(key_id)
        if users:
            shown = ", ".join(users[:5]) + (" ..." if len(users) > 5 else "")
            raise RotationConflict(
                f"codec key {key_id!r} is still needed by {len(users)} open workflow(s) "
                f"({shown}); retire it once they have closed"
            )
        if not yes:
            err.print(
                f"no open workflow needs codec key {key_id} ({usage.scanned} checked). Closed "
                "histories it encrypted will no longer decrypt; run again with --yes to retire it.",
                highlight=False,
            )
            return 1
        await ring.retire(key_id, settle_seconds=settle_seconds(load_settings()))
        out.print(f"codec key {key_id} retired", highlight=False)
        return 0

    run(go())


@codec_app.command("new-secret")
def new_secret() -> None:
    """Print 32 random bytes in base64: for LETHE_KEYS_MASTER_KEY or LETHE_SUBJECT_KEY."""
    typer.echo(base64.b64encode(os.urandom(SECRET_KEY_BYTES)).decode())
    err.print(
        "Keep it in your secret store: losing the master key loses every key it seals, and "
        "changing the subject key changes every subject reference.",
        highlight=False,
    )


@codec_app.command("new-token")
def new_token() -> None:
    """Print a new random bearer token as a LETHE_CODEC_SERVER_TOKENS entry."""
    typer.echo(f"LETHE_CODEC_SERVER_TOKENS={secrets.token_urlsafe(32)}")
    err.print(
        "Give it only to auditors allowed to read decrypted history. Separate several tokens "
        "with commas; remove one to revoke it.",
        highlight=False,
    )
