"""What a small request costs beyond its compute: one 1 x 64-token forward_backward.

The same request (the bench model of train_throughput.py, rank-16 LoRA, summed
cross-entropy) runs in lathe's engine alone, in this process (its compute, with nothing
around it), and through the tinker SDK against `lathe serve` one call at a time (decode,
queueing, the engine process's channel, result encoding, the HTTP round trips and the
SDK's polling). Prints the median time of each and the difference: the per-request
overhead a small RL or evaluation step pays.

    python bench/request_overhead.py [--calls 30] [--seq-len 64]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from train_throughput import NAME, SPEC

from lathe.engine.host_memory import keep_freed_memory
from lathe.local_server import LOCAL_API_KEY, LocalServer
from lathe.protocol import messages as m
from lathe.testing.tiny_models import make_tiny

RANK = 16


def row(seq_len: int) -> tuple[list[int], list[int]]:
    tokens = np.random.default_rng(0).integers(0, 8000, size=seq_len + 1).tolist()
    return tokens[:-1], tokens[1:]


def engine_ms(model_dir: Path, seq_len: int, calls: int) -> float:
    """Median ms of the request in the engine alone (Runner.run_one, this process)."""
    from lathe.engine.runner import Runner, load_base_model

    keep_freed_memory()  # as `lathe serve` does
    runner = Runner({NAME: load_base_model(NAME, model_dir, torch.float32, "cpu")})
    create = m.CreateModelRequest("s:train:0", NAME, m.LoraConfig(rank=RANK), seed=0)
    assert runner.run_one(m.Work("c", create)).error is None
    x, y = row(seq_len)
    datum = m.Datum(x, {"target_tokens": np.array(y, dtype=np.int64)})
    times = []
    for seq in range(1, calls + 3):
        req = m.ForwardBackwardRequest("s:train:0", seq, [datum], "cross_entropy", {}, False)
        start = time.perf_counter()
        done = runner.run_one(m.Work(f"f{seq}", req))
        times.append(time.perf_counter() - start)
        assert done.error is None
    return statistics.median(times[2:]) * 1000


def sdk_ms(model_dir: Path, seq_len: int, calls: int) -> float:
    """Median ms of the request through the SDK, one call at a time (`.result()` each)."""
    import tinker
    from tinker import types

    x, y = row(seq_len)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(x), loss_fn_inputs={"target_tokens": y}
    )
    with tempfile.TemporaryDirectory() as tmp, LocalServer({NAME: model_dir}, Path(tmp)) as srv:
        with tinker.ServiceClient(base_url=srv.base_url, api_key=LOCAL_API_KEY) as sc:
            tc = sc.create_lora_training_client(base_model=NAME, rank=RANK, seed=0).result()
            times = []
            for _ in range(calls + 2):
                start = time.perf_counter()
                tc.forward_backward([datum], "cross_entropy").result()
                times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny(Path(tmp) / NAME, SPEC)
        sdk = sdk_ms(model_dir, args.seq_len, args.calls)
        engine = engine_ms(model_dir, args.seq_len, args.calls)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"request: forward_backward of 1 x {args.seq_len} tokens, rank-{RANK} LoRA")
    print("| setup | median ms | / engine alone |")
    print("|---|---:|---:|")
    print(f"| lathe engine alone, in process (its compute) | {engine:.1f} | 1.00 |")
    print(f"| lathe via tinker SDK, one call at a time | {sdk:.1f} | {sdk / engine:.2f} |")
    print(f"| overhead: SDK minus engine | {sdk - engine:.1f} | {(sdk - engine) / engine:.2f} |")


if __name__ == "__main__":
    main()
