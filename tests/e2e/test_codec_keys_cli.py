"""`lethe codec rotate | keys | retire` as an operator runs them, on a key store of their own."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import stack_variable
from tests.e2e.conftest import run_lethe


async def test_rotate_list_and_retire_with_their_refusals(tmp_path: Path) -> None:
    stack_variable("LETHE_KEYS_MASTER_KEY")
    env = dict(os.environ, LETHE_KEYS_STORE_URL=f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}")

    listed = await run_lethe(env, "codec", "keys")
    assert listed.code == 0, str(listed)
    assert "no codec key yet" in listed.stdout
    for _ in range(2):
        rotated = await run_lethe(env, "codec", "rotate")
        assert rotated.code == 0, str(rotated)
        assert "is current" in rotated.stdout
    usage = await run_lethe(env, "codec", "keys", "--usage", "--json")
    assert usage.code == 0, str(usage)
    keys = usage.json()
    assert [k["current"] for k in keys] == [False, True]
    assert all(k["open_workflows"] == 0 for k in keys)  # this ring is new to the server

    current = await run_lethe(env, "codec", "retire", keys[1]["key_id"], "--yes")
    assert current.code == 2 and "is the current one" in current.stderr
    in_use = await run_lethe(env, "codec", "retire", keys[0]["key_id"], "--yes")
    assert in_use.code == 2 and "workers may still encrypt with it" in in_use.stderr
    unknown = await run_lethe(env, "codec", "retire", "nope")
    assert unknown.code == 2 and "no codec key 'nope'" in unknown.stderr
    after = await run_lethe(env, "codec", "keys", "--json")
    assert [k["retired_at"] for k in after.json()] == [None, None]
