"""`lethe demo` on the embedded default: no service but what Python brings, and it works."""

from __future__ import annotations

import os
from pathlib import Path

from tests.e2e.conftest import run_lethe


async def test_the_demo_erases_one_patient_and_certifies_it(tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LETHE_")}
    demo = await run_lethe(clean, "demo", timeout=120, cwd=tmp_path)
    shown, said = demo.stdout, demo.stderr
    assert demo.code == 0, said
    assert "plan under gdpr@" in shown
    assert "approving as demo-dpo" in said
    assert "│ outcome           │ erased" in shown
    encrypted = next(line for line in shown.splitlines() if "payloads in the server" in line)
    done, total = (int(n) for n in encrypted.split()[0:3:2])
    assert done == total > 0
    erased_row = next(line for line in shown.splitlines() if "│ p-1 " in line)
    assert "erased" in erased_row and "None" in erased_row  # name cleared, mrn nulled
    assert (tmp_path / ".lethe" / "demo" / "patients.db").is_file()
