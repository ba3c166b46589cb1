"""What every `lethe` command shares: consoles, running a coroutine, naming a request."""

from __future__ import annotations

import asyncio
import getpass
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypeVar

import typer
from pydantic import TypeAdapter, ValidationError
from rich.console import Console

from lethe.kernel.config import HostPort
from lethe.kernel.errors import LetheError
from lethe.sdk.client import Client, UnknownRequest, erasure_workflow_id

M = TypeVar("M")

out = Console()
err = Console(stderr=True, soft_wrap=True)

JsonOption = Annotated[bool, typer.Option("--json", help="print JSON instead of tables")]
VerboseOption = Annotated[
    bool, typer.Option("--verbose", "-v", help="also show what each step did (its evidence)")
]
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


def valid(factory: Callable[[], M]) -> M:
    """Build a model from command-line input; a bad value is a usage error naming the field."""
    try:
        return factory()
    except ValidationError as exc:
        problems = exc.errors(include_url=False, include_input=False)
        raise typer.BadParameter(
            "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in problems)
        ) from None


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
        if not request.startswith(("erasure-", "replay-")):
            raise UnknownRequest(
                f"{request[:80]!r} is not a request id: they look like erasure-<reference>"
            )
        return request
    if tenant and subject:
        return erasure_workflow_id(client.subject_ref(tenant, subject))
    raise UnknownRequest("name the request: its id (erasure-...), or --tenant and --subject")


def checked_bind(bind: str | None, example: str) -> str | None:
    """A `--bind` option's host:port, or a usage error showing `example`."""
    if bind is not None:
        try:
            TypeAdapter(HostPort).validate_python(bind)
        except ValidationError:
            raise typer.BadParameter(
                f"takes host:port, e.g. {example}", param_hint="--bind"
            ) from None
    return bind
