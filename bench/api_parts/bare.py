"""The bare endpoint: a FastAPI application with one route answering a constant, served by
uvicorn with the settings `lethe serve` uses (`python -m bench.api_parts.bare --bind H:P`).

It is what the framework and the server cost alone on this machine: the floor of the status
endpoint's latency, measured in the same run with the same clients.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from lethe.cli.serve import LOG_FORMAT

PATH = "/v1/constant"


class Constant(BaseModel):
    """The constant answer."""

    ok: bool


def create_app() -> FastAPI:
    """The bare application: one GET route, no middleware, no sign-in."""
    app = FastAPI(title="bare", openapi_url=None, docs_url=None, redoc_url=None)

    @app.get(PATH, response_model=Constant)
    async def constant() -> Constant:
        """Always the same answer."""
        return Constant(ok=True)

    return app


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the bare application on `--bind host:port` as `lethe serve` serves the API."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bind", required=True, help="host:port")
    host, _, port = parser.parse_args(argv).bind.rpartition(":")
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    uvicorn.run(
        create_app(),
        host=host,
        port=int(port),
        log_config=None,
        server_header=False,
        proxy_headers=False,
    )


if __name__ == "__main__":
    main()
