"""What every `lethe` command shares: consoles, running a coroutine, naming a request."""

from __future__ import annotations

import asyncio
import getpass
import os
import sys
from collections.abc import Coroutine
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console

from lethe.client import Client, erasure_workflow_id
from lethe.errors import LetheError

out = Console()
err = Console(stderr=True, soft_wrap=True)

JsonOption = Annotated[bool, typer.Option("--json", help="print JSON instead of tables")]
ByOption = Annotated[
    str, typer.Option("--by", help="who is acting (recorded in the ledger)", show_default="you")
]
TenantOption = Annotated[str | None, typer.Option("--tenant", help="the subject's tenant")]
SubjectOption = Annotated[
    str | None, typer.Option("--subject", help="the subject id (never shown or logged)")
]
RequestArgument = Annotated[
    str | None,
    typer.Argument(help="the request's workflow id (erasure-...); or give --tenant and --subject"),
]


def actor(by: str) -> str:
    """The acting person: `--by`, else the login name."""
    return by or getpass.getuser()


def run(coro: Coroutine[Any, Any, int]) -> None:
    """Run a command's coroutine; a Lethe or input error becomes one clear line and exit code 2.

    Ends with os._exit after flushing: the Temporal SDK's runtime can abort at interpreter exit
    in short-lived processes (sdk-python issue 300).
    """
    try:
        code = asyncio.run(coro)
    except LetheError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        code = 2
    except ValidationError as exc:
        for problem in exc.errors(include_url=False, include_input=False):
            where = ".".join(str(p) for p in problem["loc"])
            err.print(f"[red]error:[/red] {where}: {problem['msg']}", highlight=False)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def request_id(client: Client, request: str | None, tenant: str | None, subject: str | None) -> str:
    """The workflow id a command is about: given directly, or from tenant and subject."""
    if request:
        if not request.startswith("erasure-"):
            raise typer.BadParameter("a request id looks like erasure-<subject reference>")
        return request
    if tenant and subject:
        return erasure_workflow_id(client.subject_ref(tenant, subject))
    raise typer.BadParameter("give the request id, or --tenant and --subject")
