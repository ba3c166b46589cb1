"""The CLI refuses malformed input before it connects to anything, naming the field."""

from __future__ import annotations

import base64
import os

import pytest
from typer.testing import CliRunner

from lethe.cli.app import app
from tests.e2e.conftest import run_lethe
from tests.unit.test_planning import DATAMAP

runner = CliRunner()


def _error_box(output: str) -> str:
    """The message in the error box a usage error prints, its lines joined (rich wraps it)."""
    lines = output.splitlines()
    top = next(n for n, line in enumerate(lines) if line.startswith("╭─ Error"))
    bottom = next(n for n, line in enumerate(lines) if n > top and line.startswith("╰"))
    return " ".join(" ".join(line.strip("│ ").split()) for line in lines[top + 1 : bottom])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["erase", "--tenant", "BAD TENANT!", "--subject", "p-1"],
            "tenant: String should match pattern '^[a-z0-9][a-z0-9_-]{0,62}$'",
        ),
        (
            ["erase", "--tenant", "st-mary", "--subject", "x" * 300],
            "subject_id: String should have at most 256 characters",
        ),
        (
            ["erase", "--tenant", "st-mary", "--subject", "p-1", "--identity", "email"],
            "--identity takes NAME=VALUE, e.g. email=ada@example.org",
        ),
        (
            ["erase", "--tenant", "st-mary", "--subject", "p-1", "--identity", "E-Mail=a"],
            "identities: Value error, identity name 1 must be 1 to 31 lower-case letters, digits "
            "or _, starting with a letter",
        ),
        (
            [
                "hold",
                "place",
                "--matter",
                "m",
                "--scope",
                "category",
                "--value",
                "user.x",
                "--reason",
                "r",
            ],
            "category 'user.x' is not in the taxonomy; the closest known key is 'user'",
        ),
        (
            [
                "hold",
                "place",
                "--matter",
                "m",
                "--scope",
                "planet",
                "--value",
                "x",
                "--reason",
                "r",
            ],
            "--scope is subject, tenant, system or category",
        ),
        (
            ["erase", "--tenant", "st-mary", "--subject", "p-1\n"],
            "subject_id: Value error, the subject id holds a control character (U+000A) at "
            "position 4",
        ),
        (
            ["erase", "--tenant", "st-mary", "--subject", " p-1"],
            "subject_id: Value error, the subject id starts or ends with white space",
        ),
        (
            ["erase", "--tenant", "st-mary", "--subject", "p\u202e1"],
            "subject_id: Value error, the subject id holds a control character (U+202E) at "
            "position 2",
        ),
        (
            ["erase", "--tenant", "st-mary", "--subject", "p-1", "--identity", "email=a@b.org\r"],
            "identities: Value error, identity 'email' holds a control character (U+000D) at "
            "position 8",
        ),
        (
            ["extend", "erasure-x", "--months", "2", "--reason", "no", "--by", "dpo"],
            "reason: String should have at least 3 characters",
        ),
        (["reject", "erasure-x", "--by", "dpo"], "say why with --note"),
    ],
)
def test_bad_input_is_a_usage_error_naming_the_problem(args: list[str], message: str) -> None:
    """The whole message is the CLI's own: the field and what is wrong with it, never the value
    when it may be personal (a subject id or identity), and no traceback."""
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert _error_box(result.output) == f"Invalid value: {message}"
    assert "Traceback" not in result.output
    for personal in ("x" * 300, "p-1\n", " p-1", "p\u202e1", "a@b.org"):
        assert personal not in result.output


async def test_a_request_for_a_tenant_the_map_lacks_is_refused_before_connecting() -> None:
    """With LETHE_DATAMAP set, the CLI checks tenant and region before any workflow starts
    (the Temporal address is unreachable, so getting that far would fail differently)."""
    env = {
        **os.environ,
        "LETHE_DATAMAP": str(DATAMAP),
        "LETHE_TEMPORAL_ADDRESS": "127.0.0.1:1",
        "LETHE_SUBJECT_KEY": base64.b64encode(b"k" * 32).decode(),
        "COLUMNS": "200",
    }
    for args, expected in (
        (["--tenant", "nobody", "--subject", "p-1", "--no-wait"], "UnknownTenant"),
        (["--tenant", "st-mary", "--subject", "p-1", "--region", "us"], "RegionContradiction"),
    ):
        result = await run_lethe(env, "erase", *args)
        assert result.code == 2, str(result)
        assert expected in result.stderr and "cannot be planned" in result.stderr
        assert "127.0.0.1:1" not in result.stderr
