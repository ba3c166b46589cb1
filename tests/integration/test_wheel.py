"""The built wheel installs one top-level name, `lethe`, and runs from there alone.

Built by pip from the project (setuptools from PyPI in an isolated build), installed into a
folder of its own, and imported from that folder with the repository out of the path.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = [
    "kernel",
    "classification",
    "policies",
    "plans",
    "keys",
    "codec",
    "evidence",
    "temporal",
    "activities",
    "workflows",
    "sdk",
    "api",
    "cli",
    "examples",
]


def test_the_wheel_installs_only_lethe(tmp_path: Path) -> None:
    built = tmp_path / "built"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(built), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = built.glob("lethe-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"lethe", wheel.name.split("-py3")[0] + ".dist-info"}
    for layer in LAYERS:
        assert f"lethe/{layer}/__init__.py" in names, layer
    assert "lethe/worker.py" in names
    assert "lethe/policies/packs/gdpr.yaml" in names
    assert "lethe/examples/demo.datamap.yaml" in names
    assert "lethe/kernel/migrations/env.py" in names
    assert "lethe/evidence/migrations/store_0001_baseline.py" in names
    assert "lethe/keys/migrations/keys_0001_baseline.py" in names

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "-t", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    installed = {path.name for path in target.iterdir() if path.name != "bin"}
    assert installed == {"lethe", wheel.name.split("-py3")[0] + ".dist-info"}

    # From the installed folder, outside the repository: every layer and the worker import,
    # from there, and the repository's bare folder names are not importable.
    probe = (
        "import importlib, sys\n"
        f"layers = {LAYERS!r}\n"
        "for layer in layers + ['worker', 'workflows.erasure', 'activities.sql', 'cli.app']:\n"
        "    module = importlib.import_module('lethe.' + layer)\n"
        f"    assert module.__file__.startswith({str(target)!r}), module.__file__\n"
        "for bare in ['workflows', 'activities', 'classification', 'policies', 'worker']:\n"
        "    try:\n"
        "        importlib.import_module(bare)\n"
        "    except ModuleNotFoundError:\n"
        "        continue\n"
        "    sys.exit(f'{bare} is importable')\n"
        "from lethe.policies.model import load_pack\n"
        "import lethe.policies, pathlib\n"
        "load_pack(pathlib.Path(lethe.policies.__file__).parent / 'packs' / 'gdpr.yaml')\n"
        # The schemas' migrations run from the installed folder.
        "import asyncio\n"
        "from lethe.evidence import store\n"
        "from lethe.keys import store as key_store\n"
        "from lethe.kernel.database import upgrade_schema\n"
        "from lethe.kernel.migrations import head\n"
        "for schema in (store.schema, key_store.schema):\n"
        f"    assert str(schema.versions).startswith({str(target)!r}), schema.versions\n"
        "    done = asyncio.run(upgrade_schema('sqlite+aiosqlite:///lethe.db', schema))\n"
        "    assert done.to_revision == head(schema), done\n"
        "print('ok')\n"
    )
    ran = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r})\n" + probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.strip() == "ok"
