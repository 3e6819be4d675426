"""bench/gpu.py runs: its --smoke mode takes every path of the GPU benchmark (building a model
that shares transformers' weights, the logits check, training with one and eight adapters,
decoding) on tiny shapes on the CPU, so the script cannot rot between GPU sessions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_smoke_run_prints_every_measure():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split(" | ")[0].strip("| ") for line in out.stdout.splitlines()}
    for measure in (
        "logits: max abs log-softmax difference to transformers",
        "train tokens/s, 1 adapter",
        "train MFU",
        "train tokens/s, 8 adapters co-batched",
        "decode tokens/s, batch 1",
        "decode fraction of HBM bandwidth, batch 1",
    ):
        assert measure in rows, out.stdout
    logits = next(line for line in out.stdout.splitlines() if line.startswith("| logits"))
    assert float(logits.split("|")[2]) < 1e-4  # same weights, fp32: lathe equals transformers
