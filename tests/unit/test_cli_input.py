"""The CLI refuses malformed input before it connects to anything, naming the field."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lethe.cli.app import app
from tests.unit.test_planning import DATAMAP

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["erase", "--tenant", "BAD TENANT!", "--subject", "p-1"], "tenant"),
        (["erase", "--tenant", "st-mary", "--subject", "x" * 300], "subject_id"),
        (["erase", "--tenant", "st-mary", "--subject", "p-1", "--identity", "email"], "NAME=VALUE"),
        (["erase", "--tenant", "st-mary", "--subject", "p-1", "--identity", "E-Mail=a"], "identit"),
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
            "taxonomy",
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
            "--scope",
        ),
        (["erase", "--tenant", "st-mary", "--subject", "p-1\n"], "control character"),
        (["erase", "--tenant", "st-mary", "--subject", " p-1"], "white space"),
        (["erase", "--tenant", "st-mary", "--subject", "p\u202e1"], "control character"),
        (
            ["erase", "--tenant", "st-mary", "--subject", "p-1", "--identity", "email=a@b.org\r"],
            "control character",
        ),
        (["extend", "erasure-x", "--months", "2", "--reason", "no", "--by", "dpo"], "reason"),
        (["reject", "erasure-x", "--by", "dpo"], "--note"),
    ],
)
def test_bad_input_is_a_usage_error_naming_the_problem(args: list[str], expected: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.replace("│", " ").split())  # rich wraps the box
    assert "Traceback" not in result.output
    assert "x" * 300 not in result.output


def test_a_request_for_a_tenant_the_map_lacks_is_refused_before_connecting() -> None:
    """With LETHE_DATAMAP set, the CLI checks tenant and region before any workflow starts
    (the Temporal address is unreachable, so getting that far would fail differently)."""
    env = {
        **os.environ,
        "LETHE_DATAMAP": str(DATAMAP),
        "LETHE_TEMPORAL_ADDRESS": "127.0.0.1:1",
        "LETHE_SUBJECT_KEY": base64.b64encode(b"k" * 32).decode(),
        "COLUMNS": "200",
    }
    lethe = str(Path(sys.executable).parent / "lethe")
    for args, expected in (
        (["--tenant", "nobody", "--subject", "p-1", "--no-wait"], "UnknownTenant"),
        (["--tenant", "st-mary", "--subject", "p-1", "--region", "us"], "RegionContradiction"),
    ):
        result = subprocess.run(
            [lethe, "erase", *args], env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr and "cannot be planned" in result.stderr
        assert "127.0.0.1:1" not in result.stderr
