"""`lethe demo` on the embedded default (no service but what Python brings) and `lethe demo
--stack` on the running stack, read as a new user reads them: at 80 columns, through a pipe."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import socket
import struct
import subprocess
import termios
from pathlib import Path

import httpx
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from lethe.contracts import Certificate
from lethe.examples.seed import sql_prefix
from tests.conftest import stack_variable
from tests.e2e.conftest import LETHE, run_lethe

STATES = ("planning", "awaiting_approval", "erasing", "waiting_window", "verifying", "completed")


def _clean() -> dict[str, str]:
    """The environment of a new user: no LETHE_* settings, a screen of 80 columns."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LETHE_")}
    return {**clean, "COLUMNS": "80"}


def _step_tables(text: str) -> int:
    """How many tables of steps with their status (progress or results) the text shows."""
    return sum("┃ step" in line and "┃ status" in line for line in text.splitlines())


async def test_the_demo_erases_one_patient_and_certifies_it(tmp_path: Path) -> None:
    demo = await run_lethe(_clean(), "demo", timeout=120, cwd=tmp_path)
    shown, said = demo.stdout, demo.stderr
    assert demo.code == 0, said
    assert "plan under gdpr@" in shown
    assert "│ outcome           │ erased" in shown
    encrypted = next(line for line in shown.splitlines() if "payloads in the server" in line)
    done, total = (int(n) for n in encrypted.split()[0:3:2])
    assert done == total > 0
    erased_row = next(line for line in shown.splitlines() if "│ p-1 " in line)
    assert "erased" in erased_row and "None" in erased_row  # name cleared, mrn nulled
    assert (tmp_path / ".lethe" / "demo" / "patients.db").is_file()
    # Read at 80 columns: nothing wider, the steps with their status shown once (in the
    # certificate; progress went by line by line), the plan once.
    wide = [line for line in (shown + said).splitlines() if len(line) > 80]
    assert not wide, "\n".join(wide)
    assert _step_tables(shown + said) == 1
    assert sum("┃ basis" in line for line in shown.splitlines()) == 1
    # The approval message on lines of its own, after a blank line, never inside a table.
    lines = said.splitlines()
    at = next(n for n, line in enumerate(lines) if line.startswith("approval required:"))
    assert lines[at - 1] == "" and "approving as demo-dpo" in lines[at : at + 4]
    assert not any(c in said for c in "│┃┘└"), said  # stderr holds messages and progress only
    # The evidence: not on the screen, but in the certificate kept beside the demo's files.
    assert "rows_changed" not in shown + said
    assert "--verbose" in shown
    kept = json.loads((tmp_path / ".lethe" / "demo" / "certificate.json").read_text())
    assert all(step["evidence"]["rows_changed"] >= 1 for step in kept["steps"])
    # The end says where all five kinds are shown.
    assert "`lethe demo --stack`" in shown and "all five kinds" in shown


async def test_the_demo_without_a_terminal_prints_one_line_per_change(tmp_path: Path) -> None:
    demo = await run_lethe(_clean(), "demo", "--verbose", timeout=120, cwd=tmp_path)
    shown, said = demo.stdout, demo.stderr
    assert demo.code == 0, said
    lines = said.splitlines()
    steps = [f"patients-db/{n}" for n in range(4)]
    # Each change once: no line repeated, each step once per status it reached, each state
    # once (planning and erasing may pass between two polls).
    printed = [line for line in lines if line]
    assert len(printed) == len(set(printed)), said
    for step in steps:
        mine = [line.split(": ")[-1] for line in lines if line.startswith(f"  {step} ")]
        # planned, done, and running between them if a poll caught it: each once
        assert mine in (["planned", "done"], ["planned", "running", "done"]), said
    states = [line.split(":")[0] for line in lines if line.split(":")[0] in STATES]
    assert [s for s in states if s not in ("planning", "erasing")] == [
        "awaiting_approval",
        "completed",
    ], said
    # --verbose: each step's evidence, below the certificate's table, still within 80 columns.
    assert "rows_changed=" in shown and "evidence" in shown
    wide = [line for line in (shown + said).splitlines() if len(line) > 80]
    assert not wide, "\n".join(wide)


async def test_the_retention_demo_sweeps_old_sessions_except_the_held_patient_s(
    tmp_path: Path,
) -> None:
    demo = await run_lethe(_clean(), "demo", "--retention", timeout=120, cwd=tmp_path)
    shown, said = demo.stdout, demo.stderr
    assert demo.code == 0, said
    assert "30 portal sessions" in said and "legal hold hold-" in said
    assert "would remove 12; kept for legal holds 3; 0 task(s) failed" in shown
    assert "\nremoved 12; kept for legal holds 3; 0 task(s) failed" in shown
    left = {
        line.split("│")[1].strip(): int(line.split("│")[2])
        for line in shown.splitlines()
        if line.startswith("│ p-")
    }
    # Six sessions each over six months, half of them past 90 days: three left, all six for
    # the patient on hold.
    assert left == {"p-1": 3, "p-2 (on legal hold)": 6, "p-3": 3, "p-4": 3, "p-5": 3}


def _stack_env() -> dict[str, str]:
    """The running stack's settings (tests/conftest.py loads .stack/env), at 80 columns."""
    for name in ("LETHE_STACK_SQL_URL", "LETHE_STORE_URL", "LETHE_SUBJECT_KEY"):
        stack_variable(name)
    return {**os.environ, "COLUMNS": "80"}


async def test_the_stack_demo_erases_from_all_five_kinds_and_cleans_up(tmp_path: Path) -> None:
    demo = await run_lethe(_stack_env(), "demo", "--stack", timeout=120, cwd=tmp_path)
    shown, said = demo.stdout, demo.stderr
    assert demo.code == 0, str(demo)
    assert "erasure certificate: erased" in shown
    rows = {
        line.split("│")[1].strip(): line.split("│")[2].strip()
        for line in shown.splitlines()
        # The certificate's steps: five columns, a step id first (the plan has four).
        if line.startswith("│ ") and line.count("│") == 6 and "/" in line.split("│")[1]
    }
    assert rows == dict.fromkeys(
        [
            "patients-db/0",
            "patients-db/1",
            "patients-db/2",
            "patient-events/0",
            "session-cache/0",
            "backups/0",
            "backups/1",
            "app-logs/0",
        ],
        "done",
    ), shown
    kept = json.loads((tmp_path / ".lethe" / "demo-stack" / "certificate.json").read_text())
    kinds = {step.kind for step in Certificate.model_validate(kept).plan.steps}
    assert kinds == {"sql", "kafka", "redis", "blob", "logs"}
    assert "a new patient registers" in said
    wide = [line for line in (shown + said).splitlines() if len(line) > 80]
    assert not wide, "\n".join(wide)
    assert _step_tables(shown + said) == 1
    # The run's data is gone from the stack: its tables no longer exist.
    prefix = next(line for line in said.splitlines() if "every name under" in line)
    tables = sql_prefix(prefix.split("'")[1])
    engine = create_async_engine(os.environ["LETHE_STACK_SQL_URL"])
    async with engine.connect() as conn:
        names = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
    await engine.dispose()
    assert tables and not [name for name in names if name.startswith(tables)]


async def test_the_stack_demo_names_what_is_missing_or_down(tmp_path: Path) -> None:
    unset = {k: v for k, v in _stack_env().items() if not k.startswith("LETHE_STACK_")}
    refused = await run_lethe(unset, "demo", "--stack", cwd=tmp_path)
    assert refused.code == 2, str(refused)
    assert "needs LETHE_STACK_SQL_URL, LETHE_STACK_KAFKA_BOOTSTRAP" in refused.stderr
    assert "make stack" in refused.stderr and "Traceback" not in refused.stderr
    down = {**_stack_env(), "LETHE_STACK_REDIS_URL": "redis://127.0.0.1:1/0"}
    refused = await run_lethe(down, "demo", "--stack", cwd=tmp_path)
    assert refused.code == 2, str(refused)
    problems = refused.stderr.split("the stack is not reachable:")[1].strip().splitlines()
    assert problems[0].startswith("Redis at redis://127.0.0.1:1") and len(problems) == 2
    assert not (tmp_path / ".lethe" / "demo-stack").exists()  # nothing seeded, nothing written


async def test_the_demo_on_a_terminal_draws_progress_in_place(tmp_path: Path) -> None:
    screen = await asyncio.to_thread(_on_a_terminal, _clean(), tmp_path)
    assert "erasure certificate: erased" in screen
    assert "\x1b[1A" in screen or "\x1b[2K" in screen  # the live display moved up to redraw
    assert "awaiting_approval: 4 planned" not in screen  # no change lines on a terminal
    # What stays on the screen, once the live display is gone: the approval message, then the
    # certificate (the table of steps with their status is redrawn, never printed again).
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
    assert "approving as demo-dpo" in plain


def _on_a_terminal(env: dict[str, str], cwd: Path) -> str:
    """`lethe demo` with a pseudo-terminal of 80 columns for stdout and stderr: what it wrote."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 80, 0, 0))
    process = subprocess.Popen(
        [LETHE, "demo"], cwd=cwd, env=env, stdout=follower, stderr=follower, stdin=follower
    )
    os.close(follower)
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(timeout=120) == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


async def test_the_served_demo_gives_the_console_and_a_dpo_token(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**_clean(), "LETHE_API_BIND": f"127.0.0.1:{port}"}
    process = await asyncio.create_subprocess_exec(
        LETHE,
        "demo",
        "--serve",
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(120):
            shown = ""
            while not re.search(r"lethe_tok_\S+", shown):
                line = await process.stdout.readline()
                assert line, f"the demo ended before giving a token:\n{shown}"
                shown += line.decode()
        assert f"http://127.0.0.1:{port}/console" in shown
        token = re.findall(r"lethe_tok_\S+", shown)[-1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            async with asyncio.timeout(30):
                while True:
                    try:
                        me = await http.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
                        break
                    except httpx.ConnectError:
                        await asyncio.sleep(0.2)
            assert me.json() == {"name": "demo-dpo", "role": "dpo", "tenant": "st-mary"}
            listed = await http.get("/v1/erasures", headers={"Authorization": f"Bearer {token}"})
            assert [r["state"] for r in listed.json()] == ["completed"]
            assert (await http.get("/console/sign-in")).status_code == 200
    finally:
        process.send_signal(2)  # Ctrl-C
        async with asyncio.timeout(60):
            await process.wait()
