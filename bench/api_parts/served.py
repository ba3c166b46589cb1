"""`lethe serve` as the benchmark runs it when it profiles it: `python -m cProfile -o F -m
bench.api_parts.served serve --bind H:P`.

uvicorn raises the signal that stopped it again once it has shut down; with the default handler
SIGTERM would end the process before cProfile writes its output, so here it exits normally.
"""

from __future__ import annotations

import signal
import sys

from lethe.cli.app import app


def _exit(*_: object) -> None:
    sys.exit(0)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit)
    app(prog_name="lethe")
