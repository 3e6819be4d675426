"""The layer contracts in pyproject.toml hold, and they do fail on an import that runs back up."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(src: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=cwd,
        env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_import_graph_keeps_to_the_layers():
    r = lint_imports(ROOT / "src", ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_an_import_running_back_up_fails_the_lint(tmp_path):
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    db = tmp_path / "src" / "lathe" / "store" / "db.py"
    db.write_text(db.read_text() + "\nimport lathe.engine.runner  # noqa: E402  (a back-edge)\n")
    r = lint_imports(tmp_path / "src", tmp_path)
    assert r.returncode != 0
    assert "lathe.store.db -> lathe.engine.runner" in r.stdout
    assert "never import torch BROKEN" in r.stdout  # runner brings torch into the store
