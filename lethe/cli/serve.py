"""`lethe serve`: the HTTP API and the console, served by uvicorn until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from lethe.cli.common import checked_bind, err, run
from lethe.kernel.config import load_settings
from lethe.sdk.client import Client

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def register(app: typer.Typer) -> None:
    """Add the serve command to the `lethe` app."""
    app.command("serve")(serve)


def serve(
    bind: Annotated[
        str | None,
        typer.Option("--bind", help="host:port to listen on", show_default="LETHE_API_BIND"),
    ] = None,
) -> None:
    """Serve the HTTP API (/v1, OpenAPI at /openapi.json) and the console (/console)."""
    checked_bind(bind, "127.0.0.1:8700")
    run(_serve(bind))


async def _serve(bind: str | None) -> int:
    import uvicorn  # imported here: the other commands start without the web stack

    from lethe.api.app import api_settings, create_app

    settings = api_settings(load_settings())
    host, _, port = (bind or settings.api_bind).rpartition(":")
    # Connected before serving: a setting or a service that is missing is one clear line.
    client = await Client.connect(settings)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, client),
            host=host.strip("[]"),
            port=int(port),
            log_config=None,
            server_header=False,
            proxy_headers=False,
        )
    )
    base = f"http://{host}:{port}"
    err.print(
        f"Lethe API on {base}/v1 (OpenAPI: {base}/openapi.json), console on {base}/console\n"
        "  sign in with a token from `lethe tokens create --role dpo --tenant <tenant>`",
        highlight=False,
    )
    await server.serve()
    return 0
