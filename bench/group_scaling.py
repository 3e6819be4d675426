"""The engine group on one machine: `--ranks 1` against `--ranks N`, the same cores in all.

One SDK client trains the bench model (bench/train_throughput.py's shapes) with pipelined
forward_backward + optim_step steps on `--batch` x `--seq-len` tokens, then samples a batch,
through three servers started in this script:

- 1 rank with all the cores (torch's threads),
- 1 rank with one core (`--threads 1`): what each rank of the group has,
- N ranks with one core each (`--ranks N --threads 1`): each holds 1/N of the base weights
  (FSDP2) and trains on its share of the datums (data parallel); sampling runs on every rank.

Prints training tokens/s, sampled tokens/s, and the ratios to one rank with all the cores.

    python bench/group_scaling.py [--ranks 2] [--steps 4] [--batch 16] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from multi_tenant import RANK, make_data
from train_throughput import NAME, SPEC

from lathe.local_server import LOCAL_API_KEY, LocalServer
from lathe.testing.tiny_models import make_tiny


def run(base_url: str, steps: int, batch: int, seq_len: int, samples: int) -> dict[str, float]:
    import tinker
    from tinker import types

    data = make_data(batch, seq_len, seed=0)
    adam = types.AdamParams(learning_rate=1e-4)
    with tinker.ServiceClient(base_url=base_url, api_key=LOCAL_API_KEY) as service:
        client = service.create_lora_training_client(base_model=NAME, rank=RANK, seed=0).result()
        client.forward_backward(data, "cross_entropy").result()  # warm-up
        client.optim_step(adam).result()
        began = time.perf_counter()
        futures = []
        for _ in range(steps):
            futures.append(client.forward_backward(data, "cross_entropy"))
            futures.append(client.optim_step(adam))
        for f in futures:
            f.result()
        train = steps * batch * seq_len / (time.perf_counter() - began)
        sampler = client.save_weights_and_get_sampling_client().result()
        prompt = types.ModelInput.from_ints(list(range(1, 33)))
        params = types.SamplingParams(max_tokens=32, temperature=1.0, seed=0)
        sampler.sample(prompt, 2, params).result()  # warm-up
        began = time.perf_counter()
        out = sampler.sample(prompt, samples, params).result()
        sampled = sum(len(s.tokens) for s in out.sequences) / (time.perf_counter() - began)
    return {"training tokens/s": train, "sampled tokens/s": sampled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16, help="rows per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    parser.add_argument("--samples", type=int, default=16, help="sequences sampled at once")
    args = parser.parse_args()
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny(Path(tmp) / "model", SPEC)
        setups = {
            f"1 rank, {torch.get_num_threads()} threads": (),
            "1 rank, 1 thread": ("--threads", "1"),
            f"{args.ranks} ranks, 1 thread each": ("--ranks", str(args.ranks), "--threads", "1"),
        }
        for label, flags in setups.items():
            with LocalServer({NAME: model}, Path(tmp) / label.replace(" ", "_"), *flags) as srv:
                rows[label] = run(srv.base_url, args.steps, args.batch, args.seq_len, args.samples)
    base = next(iter(rows.values()))
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}; {args.batch} x {args.seq_len} tokens per step, "
          f"{args.samples} x 32 sampled tokens")  # fmt: skip
    print(f"{'setup':28} {'train tok/s':>12} {'ratio':>6} {'sample tok/s':>13} {'ratio':>6}")
    for label, r in rows.items():
        t, s = r["training tokens/s"], r["sampled tokens/s"]
        t0, s0 = base["training tokens/s"], base["sampled tokens/s"]
        print(f"{label:28} {t:12.0f} {t / t0:6.2f} {s:13.0f} {s / s0:6.2f}")


if __name__ == "__main__":
    main()
