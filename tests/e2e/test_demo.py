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


async def test_the_retention_demo_sweeps_old_sessions_except_the_held_patient_s(
    tmp_path: Path,
) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LETHE_")}
    demo = await run_lethe(clean, "demo", "--retention", timeout=120, cwd=tmp_path)
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
