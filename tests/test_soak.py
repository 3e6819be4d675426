"""The CI-sized soak (bench/soak.py): 4 SDK clients for 2 minutes of mixed training, RL
sampling, prefix-shared sampling, checkpoint save/load/delete and REST listing, against one
`lathe serve`. No errors, memory flat after warm-up, nothing left pending, every checkpoint
kept intact and loadable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_a_two_minute_soak_of_four_clients(tmp_path):
    out = tmp_path / "soak.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--clients", "4", "--minutes", "2"]
        + ["--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["errors"] == {}, result["error_examples"]
    assert set(result["requests"]) == {"sft", "rl", "prefix", "checkpoint", "rest"}
    assert result["rss_growth"] < 0.10, result
    assert result["pending_futures"] == 0
    assert result["checkpoints_kept"] > 0
    assert result["checkpoints_damaged"] == [] and result["checkpoints_that_failed_to_load"] == []
    assert result["server_alive"] and result["stuck_clients"] == 0
