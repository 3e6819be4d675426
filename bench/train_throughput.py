"""Training throughput: lathe through the tinker SDK over HTTP vs a transformers + peft loop.

Same model (a ~22M-parameter Qwen3-shaped random model), same batch, same LoRA rank and
targets (every attention and MLP projection plus the unembedding), same loss (summed token
cross-entropy) and optimizer (AdamW). Prints tokens/s of both and their ratio.

    python bench/train_throughput.py [--steps 10] [--batch 8] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from lathe.local_server import LOCAL_API_KEY, LocalServer
from lathe.testing.tiny_models import TinyModelSpec, make_tiny

SPEC = TinyModelSpec(
    family="qwen3",
    num_layers=6,
    hidden_size=512,
    intermediate_size=1536,
    num_heads=8,
    num_kv_heads=4,
    head_dim=64,
    vocab_size=8192,
    seed=0,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
NAME = "bench-qwen3-22m"


def make_batch(batch: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 8000, size=(batch, seq_len + 1))
    return tokens[:, :-1], tokens[:, 1:]


def bench_lathe(model_dir: Path, inputs, targets, rank: int, steps: int, warmup: int) -> float:
    import tinker
    from tinker import types

    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(x.tolist()),
            loss_fn_inputs={"target_tokens": y.tolist()},
        )
        for x, y in zip(inputs, targets, strict=True)
    ]
    with tempfile.TemporaryDirectory() as tmp, LocalServer({NAME: model_dir}, Path(tmp)) as srv:
        with tinker.ServiceClient(base_url=srv.base_url, api_key=LOCAL_API_KEY) as sc:
            tc = sc.create_lora_training_client(base_model=NAME, rank=rank, seed=0).result()
            adam = types.AdamParams(learning_rate=1e-4)
            for _ in range(warmup):
                tc.forward_backward(data, "cross_entropy").result()
                tc.optim_step(adam).result()
            start = time.perf_counter()
            futures = []
            for _ in range(steps):  # pipelined, as a training loop that does not block would be
                futures.append(tc.forward_backward(data, "cross_entropy"))
                futures.append(tc.optim_step(adam))
            for f in futures:
                f.result()
            elapsed = time.perf_counter() - start
    return steps * inputs.size / elapsed


def bench_peft(model_dir: Path, inputs, targets, rank: int, steps: int, warmup: int) -> float:
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = peft.LoraConfig(r=rank, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0)
    model = peft.get_peft_model(model, cfg)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=1e-4,
        betas=(0.9, 0.95),
        eps=1e-12,
        weight_decay=0.0,
    )
    x, y = torch.from_numpy(inputs), torch.from_numpy(targets)

    def step() -> None:
        logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
        loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * inputs.size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("TINKER_TELEMETRY", "0")

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny(Path(tmp) / NAME, SPEC)
        n_params = sum(t.numel() for t in load_file(str(model_dir / "model.safetensors")).values())
        inputs, targets = make_batch(args.batch, args.seq_len)
        peft_tps = bench_peft(model_dir, inputs, targets, args.rank, args.steps, args.warmup)
        lathe_tps = bench_lathe(model_dir, inputs, targets, args.rank, args.steps, args.warmup)

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"model: Qwen3-shaped, {n_params / 1e6:.1f}M parameters; batch {args.batch} x "
        f"{args.seq_len} tokens; LoRA rank {args.rank} on {', '.join(TARGETS)}"
    )
    print("| setup | tokens/s | ratio |")
    print("|---|---:|---:|")
    print(f"| transformers + peft, one process | {peft_tps:,.0f} | 1.00 |")
    print(f"| lathe via tinker SDK over HTTP | {lathe_tps:,.0f} | {lathe_tps / peft_tps:.2f} |")


if __name__ == "__main__":
    main()
