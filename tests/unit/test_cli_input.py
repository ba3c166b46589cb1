"""The CLI refuses malformed input before it connects to anything, naming the field."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from lethe.cli import app

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
        (["extend", "erasure-x", "--months", "2", "--reason", "no", "--by", "dpo"], "reason"),
        (["reject", "erasure-x", "--by", "dpo"], "--note"),
    ],
)
def test_bad_input_is_a_usage_error_naming_the_problem(args: list[str], expected: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "Traceback" not in result.output
    assert "x" * 300 not in result.output
