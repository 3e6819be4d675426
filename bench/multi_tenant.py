"""Many tenants, one base model: N SDK clients training their own adapters at once.

For N = 1, 2, 4, 8, each of N clients (its own ServiceClient, session and LoRA adapter on the
same base model) runs the same job: `--steps` pipelined steps of forward_backward on a batch
of `--batch` x `--seq-len` tokens (default 4 x 128) plus optim_step. Three ways to run the
same N jobs through one lathe server:

- concurrent: all N clients at once (lathe co-batches their steps),
- sequential: the N jobs one after another,
- big batch: one client whose batch is N times larger (the single-tenant best case),

and, on a second server started with `--deterministic`, the concurrent run again (the cost of
batch-invariant mode). Prints aggregate training tokens/s and the ratios.

    python bench/multi_tenant.py [--steps 4] [--tenants 1,2,4,8] [--batch 4] [--seq-len 128]

`--batch 1 --seq-len 64` is the shape of many RL and evaluation loops: each tenant's step
alone leaves the machine mostly idle.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from train_throughput import NAME, SPEC

from lathe.local_server import LOCAL_API_KEY, LocalServer
from lathe.testing.tiny_models import make_tiny

RANK = 16


def make_data(batch: int, seq_len: int, seed: int) -> list:
    from tinker import types

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 8000, size=(batch, seq_len + 1))
    return [
        types.Datum(
            model_input=types.ModelInput.from_ints(row[:-1].tolist()),
            loss_fn_inputs={"target_tokens": row[1:].tolist()},
        )
        for row in tokens
    ]


class Job:
    """One tenant: a client with its adapter, warmed up, ready to run `steps` timed steps."""

    def __init__(self, base_url: str, batch: int, seq_len: int, seed: int) -> None:
        import tinker

        self.service = tinker.ServiceClient(base_url=base_url, api_key=LOCAL_API_KEY)
        self.client = self.service.create_lora_training_client(
            base_model=NAME, rank=RANK, seed=seed
        ).result()
        self.data = make_data(batch, seq_len, seed)
        self.tokens_per_step = batch * seq_len
        self.run(1)  # warm-up: first-use costs are not throughput

    def run(self, steps: int) -> int:
        from tinker import types

        adam = types.AdamParams(learning_rate=1e-4)
        futures = []
        for _ in range(steps):  # pipelined, as a training loop that does not block would be
            futures.append(self.client.forward_backward(self.data, "cross_entropy"))
            futures.append(self.client.optim_step(adam))
        for f in futures:
            f.result()
        return steps * self.tokens_per_step

    def close(self) -> None:
        self.service.close("success").result()  # ends the session: its adapter is unloaded


def concurrent(jobs: list[Job], steps: int) -> float:
    tokens = [0] * len(jobs)
    start = threading.Barrier(len(jobs) + 1)

    def run(i: int) -> None:
        start.wait()
        tokens[i] = jobs[i].run(steps)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    return sum(tokens) / (time.perf_counter() - began)


def sequential(jobs: list[Job], steps: int) -> float:
    began = time.perf_counter()
    tokens = sum(job.run(steps) for job in jobs)
    return tokens / (time.perf_counter() - began)


def measure(
    base_url: str, n: int, steps: int, deterministic_url: str, batch: int, seq_len: int
) -> dict[str, float]:
    jobs = [Job(base_url, batch, seq_len, seed) for seed in range(n)]
    try:
        result = {"concurrent": concurrent(jobs, steps), "sequential": sequential(jobs, steps)}
    finally:
        for job in jobs:
            job.close()
    big = Job(base_url, batch * n, seq_len, seed=100)
    try:
        result["big batch"] = sequential([big], steps)
    finally:
        big.close()
    jobs = [Job(deterministic_url, batch, seq_len, seed) for seed in range(n)]
    try:
        result["concurrent, deterministic"] = concurrent(jobs, steps)
    finally:
        for job in jobs:
            job.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tenants", default="1,2,4,8")
    parser.add_argument("--batch", type=int, default=4, help="rows per step of each tenant")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per row")
    args = parser.parse_args()
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    counts = [int(n) for n in args.tenants.split(",")]

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny(Path(tmp) / NAME, SPEC)
        with (
            LocalServer({NAME: model_dir}, Path(tmp) / "plain") as plain,
            LocalServer({NAME: model_dir}, Path(tmp) / "det", "--deterministic") as det,
        ):
            for n in counts:
                rows[n] = measure(
                    plain.base_url, n, args.steps, det.base_url, args.batch, args.seq_len
                )
                print(f"N={n}: " + ", ".join(f"{k} {v:,.0f}" for k, v in rows[n].items()))

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
        f"each tenant: batch {args.batch} x {args.seq_len} tokens, LoRA rank {RANK}, "
        f"{args.steps} steps"
    )
    print(
        "| N | concurrent tok/s | sequential tok/s | big batch tok/s "
        "| concurrent / sequential | concurrent / big batch | deterministic / concurrent |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, r in rows.items():
        print(
            f"| {n} | {r['concurrent']:,.0f} | {r['sequential']:,.0f} | {r['big batch']:,.0f} "
            f"| {r['concurrent'] / r['sequential']:.2f} | {r['concurrent'] / r['big batch']:.2f} "
            f"| {r['concurrent, deterministic'] / r['concurrent']:.2f} |"
        )


if __name__ == "__main__":
    main()
