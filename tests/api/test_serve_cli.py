"""`lethe tokens` and `lethe serve` as processes: a token made on the command line signs in to
the server it starts; a server that cannot reach Temporal says so in one line."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import httpx

from tests.e2e.conftest import LETHE, run_lethe


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_token_from_the_cli_signs_in_to_lethe_serve(tmp_path: Path) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "LETHE_STORE_URL": f"sqlite+aiosqlite:///{tmp_path / 'lethe.db'}",
        "LETHE_API_BIND": f"127.0.0.1:{port}",
    }
    made = await run_lethe(env, "tokens", "create", "--role", "auditor", "--name", "cli-test")
    assert made.code == 0, str(made)
    token = made.stdout.strip()
    assert token.startswith("lethe_tok_") and token not in made.stderr
    listed = await run_lethe(env, "tokens", "list", "--json")
    assert [t["name"] for t in listed.json()] == ["cli-test"]
    assert token.split("_")[-1] not in listed.stdout
    server = await asyncio.create_subprocess_exec(
        LETHE, "serve", cwd=tmp_path, env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            async with asyncio.timeout(30):
                while True:
                    try:
                        me = await http.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
                        break
                    except httpx.ConnectError:
                        await asyncio.sleep(0.2)
            assert me.json() == {"name": "cli-test", "role": "auditor", "tenant": None}
            document = (await http.get("/openapi.json")).json()
            assert document["openapi"].startswith("3.1")
    finally:
        server.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            # uvicorn shuts down, then raises the signal again (as systemd expects).
            assert await server.wait() in (0, -signal.SIGTERM)
    assert server.stderr is not None
    said = (await server.stderr.read()).decode()
    assert f"console on http://127.0.0.1:{port}/console" in said
    assert "Application shutdown complete" in said
    assert token not in said


async def test_lethe_serve_without_temporal_says_so_in_one_line(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "LETHE_STORE_URL": f"sqlite+aiosqlite:///{tmp_path / 'lethe.db'}",
        "LETHE_TEMPORAL_ADDRESS": "127.0.0.1:1",
        "LETHE_API_BIND": f"127.0.0.1:{_free_port()}",
    }
    served = await run_lethe(env, "serve", timeout=60)
    assert served.code == 2, str(served)
    assert "cannot reach Temporal at 127.0.0.1:1" in served.stderr
    assert "Traceback" not in served.stderr
