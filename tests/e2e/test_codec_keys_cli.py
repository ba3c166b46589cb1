"""`lethe codec rotate | keys | retire` as an operator runs them, on a key store of their own."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from tests.conftest import stack_variable

LETHE = str(Path(sys.executable).parent / "lethe")
ROOT = Path(__file__).resolve().parents[2]


async def lethe(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """Run `lethe ARGS`; its exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        LETHE,
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_rotate_list_and_retire_with_their_refusals(tmp_path: Path) -> None:
    stack_variable("LETHE_KEYS_MASTER_KEY")
    env = dict(os.environ, LETHE_KEYS_STORE_URL=f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}")

    code, out, err = await lethe(env, "codec", "keys")
    assert code == 0, err
    assert "no codec key yet" in out
    for _ in range(2):
        code, out, err = await lethe(env, "codec", "rotate")
        assert code == 0, err
        assert "is current" in out
    code, out, err = await lethe(env, "codec", "keys", "--usage", "--json")
    assert code == 0, err
    listed = json.loads(out)
    assert [k["current"] for k in listed] == [False, True]
    assert all(k["open_workflows"] == 0 for k in listed)  # this ring is new to the server

    code, _, err = await lethe(env, "codec", "retire", listed[1]["key_id"], "--yes")
    assert code == 2 and "is the current one" in err
    code, _, err = await lethe(env, "codec", "retire", listed[0]["key_id"], "--yes")
    assert code == 2 and "workers may still encrypt with it" in err
    code, _, err = await lethe(env, "codec", "retire", "nope")
    assert code == 2 and "no codec key 'nope'" in err
    code, out, _ = await lethe(env, "codec", "keys", "--json")
    assert [k["retired_at"] for k in json.loads(out)] == [None, None]
