"""`lathe demo`, the README's first command, end to end: it must teach the tiny model."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_the_demo_learns_the_task(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "lathe", "demo", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    before, after = map(int, re.search(r"exact match: (\d+)% -> (\d+)%", r.stdout).groups())
    assert before < 10 and after >= 80, r.stdout[-2000:]
    assert "checkpoint: tinker://" in r.stdout
