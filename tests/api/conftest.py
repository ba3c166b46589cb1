"""The API served by uvicorn on a free port, over the sample hospital on the real stack.

The hospital (tests/e2e) brings its own tenant, queues, data and store database; a worker
process serves it. Tokens are made for each role: the hospital's tenant `A`, another tenant `B`.
Every uvicorn access-log line is kept, to be scanned for subject ids.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
import pytest
import uvicorn

from lethe.api.app import create_app
from lethe.evidence import tokens
from lethe.evidence.store import engine_for
from lethe.kernel.config import Settings
from tests.e2e.conftest import Hospital, WorkerProcess
from tests.e2e.conftest import connections as connections
from tests.e2e.conftest import hospital as hospital
from tests.e2e.conftest import worker as worker

OTHER_TENANT = "other-clinic"
PRINCIPALS = {
    # name: (role, tenant: "A" for the hospital's, "B" for the other, None for all)
    "dpo-a": ("dpo", "A"),
    "dpo-b": ("dpo", "B"),
    "auditor-a": ("auditor", "A"),
    "auditor-all": ("auditor", None),
    "service-a": ("service", "A"),
    "service-a2": ("service", "A"),
    "admin": ("admin", None),
}


class AccessLog(logging.Handler):
    """Keeps every line uvicorn's access and error loggers write."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@dataclass
class Api:
    """The running API: its address, a token per principal, and the hospital behind it."""

    base: str
    hospital: Hospital
    secrets: dict[str, str]
    log: AccessLog
    tenants: dict[str, str] = field(default_factory=dict)

    def client(self, principal: str | None = None, **kwargs: Any) -> httpx.AsyncClient:
        """An HTTP client, signed in as `principal` (a name of PRINCIPALS) if given."""
        headers = {"Authorization": f"Bearer {self.secrets[principal]}"} if principal else {}
        return httpx.AsyncClient(base_url=self.base, headers=headers, timeout=60, **kwargs)

    def tenant(self, which: str) -> str:
        """The tenant `A` (the hospital's) or `B`."""
        return self.tenants[which]


def api_settings(hospital: Hospital) -> Settings:
    """The API's settings for the hospital (its queue, store, map and pack)."""
    return Settings(
        control_queue=hospital.control_queue,
        store_url=hospital.store_url,
        datamap=hospital.datamap,
        policy=hospital.policy,
        api_insecure_cookies=True,
    )


@pytest.fixture(scope="module")
def access_log() -> Iterator[AccessLog]:
    """uvicorn's log lines while the module's server runs."""
    handler = AccessLog()
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    loggers = [logging.getLogger(name) for name in ("uvicorn.access", "uvicorn.error", "lethe")]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
async def api(
    hospital: Hospital,
    worker: WorkerProcess,
    access_log: AccessLog,
) -> AsyncIterator[Api]:
    """`lethe serve`'s application on a free port, with a token per principal."""
    settings = api_settings(hospital)
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_config=None)
    )
    serving = asyncio.create_task(server.serve())
    async with asyncio.timeout(30):
        while not server.started:  # noqa: ASYNC110 (uvicorn offers no event to wait on)
            await asyncio.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    tenants = {"A": hospital.tenant, "B": OTHER_TENANT}
    store = await engine_for(hospital.store_url)
    secrets = {}
    for name, (role, which) in PRINCIPALS.items():
        _, secrets[name] = await tokens.create(
            store,
            name=name,
            role=role,
            tenant=tenants[which] if which else None,
            lifetime=timedelta(hours=2),
            created_by="test",
        )
    try:
        yield Api(f"http://127.0.0.1:{port}", hospital, secrets, access_log, tenants)
    finally:
        server.should_exit = True
        await serving
