"""The `lethe codec-server` command: serve decrypted payloads to auditors' Temporal UI and CLI."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Annotated

import typer

from lethe.cli.common import checked_bind, err, run
from lethe.codec.server import app_from_settings, serving
from lethe.kernel.config import load_settings


def register(app: typer.Typer) -> None:
    """Add the codec-server command to the `lethe` app."""
    app.command("codec-server")(codec_server)


def codec_server(
    bind: Annotated[
        str | None,
        typer.Option(
            "--bind", help="host:port to listen on", show_default="LETHE_CODEC_SERVER_BIND"
        ),
    ] = None,
) -> None:
    """Serve the codec to the Temporal UI and CLI, for holders of a token, until SIGTERM/SIGINT."""
    checked_bind(bind, "127.0.0.1:8888")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    run(_serve(bind))


async def _serve(bind: str | None) -> int:
    settings = load_settings()
    app = await app_from_settings(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serving(app, bind or settings.codec_server_bind) as url:
        origins = ", ".join(sorted(settings.codec_server_origins)) or "none (CLI only)"
        err.print(
            f"codec server for namespace {settings.temporal_namespace!r} on {url}\n"
            f"  CLI: temporal ... --codec-endpoint {url} --codec-auth 'Bearer <token>'\n"
            f"  browser origins allowed: {origins}",
            highlight=False,
        )
        await stop.wait()
    err.print("codec server stopped", highlight=False)
    return 0
