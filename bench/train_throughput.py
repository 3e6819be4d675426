"""Training throughput: lathe through the tinker SDK over HTTP vs a transformers + peft loop,
vs the limit.

Same model (a ~22M-parameter Qwen3-shaped random model), same batch, same LoRA rank and
targets (every attention and MLP projection plus the unembedding), same loss (summed token
cross-entropy) and optimizer (AdamW). The limit is the bare matmul chain of the same step:
every frozen linear layer's forward and input-gradient matmul over the batch's real tokens
(what a LoRA step cannot avoid; no attention, LoRA, loss or optimizer). Prints real
tokens/s of each, their ratio to lathe, and their fraction of the limit.

Workloads:
  default    --batch 8 rows of --seq-len 128 tokens
  --mixed    16 rows of 32..384 tokens; the peft loop pads every row to the longest, as
             its collator does (only real tokens count)

    python bench/train_throughput.py [--steps 10] [--batch 8] [--seq-len 128] [--mixed]
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


def make_batch(batch: int, seq_len: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 8000, size=(batch, seq_len + 1))
    return list(tokens[:, :-1]), list(tokens[:, 1:])


def make_mixed_batch(batch: int = 16) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Rows of 32..384 tokens (inputs and their next-token targets)."""
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 8000, size=n + 1) for n in rng.integers(32, 385, size=batch)]
    return [r[:-1] for r in rows], [r[1:] for r in rows]


def real_tokens(inputs: list[np.ndarray]) -> int:
    return sum(len(x) for x in inputs)


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
    return steps * real_tokens(inputs) / elapsed


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
    # Right-padded to the longest row, as a collator does; padding is masked and ignored.
    longest = max(len(x) for x in inputs)
    x = torch.zeros(len(inputs), longest, dtype=torch.long)
    y = torch.full((len(inputs), longest), -100, dtype=torch.long)
    mask = torch.zeros(len(inputs), longest, dtype=torch.long)
    for i, (xi, yi) in enumerate(zip(inputs, targets, strict=True)):
        x[i, : len(xi)] = torch.from_numpy(xi)
        y[i, : len(yi)] = torch.from_numpy(yi)
        mask[i, : len(xi)] = 1

    def step() -> None:
        logits = model(input_ids=x, attention_mask=mask).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
        loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * real_tokens(inputs) / (time.perf_counter() - start)


def bench_limit(model_dir: Path, tokens: int, repeats: int = 5) -> float:
    """Tokens/s of the bare matmul chain of a LoRA step over `tokens` real tokens: each frozen
    linear layer's forward (x W^T) and input-gradient (dy W) matmul, fastest of `repeats`."""
    weights = load_file(str(model_dir / "model.safetensors"))
    linears = [w for name, w in weights.items() if w.ndim == 2 and "embed_tokens" not in name]
    linears.append(weights.get("lm_head.weight", weights["model.embed_tokens.weight"]))
    xs = [torch.randn(tokens, w.shape[1]) for w in linears]
    dys = [torch.randn(tokens, w.shape[0]) for w in linears]

    def run() -> float:
        start = time.perf_counter()
        for x, dy, w in zip(xs, dys, linears, strict=True):
            torch.mm(x, w.t())
            torch.mm(dy, w)
        return time.perf_counter() - start

    run()
    return tokens / min(run() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--mixed", action="store_true", help="16 rows of 32..384 tokens")
    args = parser.parse_args()
    os.environ.setdefault("TINKER_TELEMETRY", "0")

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny(Path(tmp) / NAME, SPEC)
        n_params = sum(t.numel() for t in load_file(str(model_dir / "model.safetensors")).values())
        if args.mixed:
            inputs, targets = make_mixed_batch()
            shape = f"16 rows of 32..384 tokens ({real_tokens(inputs)} tokens, peft pads each "
            shape += f"to {max(len(x) for x in inputs)})"
        else:
            inputs, targets = make_batch(args.batch, args.seq_len)
            shape = f"batch {args.batch} x {args.seq_len} tokens"
        limit = bench_limit(model_dir, real_tokens(inputs))
        peft_tps = bench_peft(model_dir, inputs, targets, args.rank, args.steps, args.warmup)
        lathe_tps = bench_lathe(model_dir, inputs, targets, args.rank, args.steps, args.warmup)

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"model: Qwen3-shaped, {n_params / 1e6:.1f}M parameters; {shape}; LoRA rank "
        f"{args.rank} on {', '.join(TARGETS)}"
    )
    rows = [
        ("limit: bare matmul chain of the step (forward + input gradients)", limit),
        ("transformers + peft, one process", peft_tps),
        ("lathe via tinker SDK over HTTP", lathe_tps),
    ]
    print("| setup | tokens/s | lathe / setup | of limit |")
    print("|---|---:|---:|---:|")
    for name, tps in rows:
        print(f"| {name} | {tps:,.0f} | {lathe_tps / tps:.2f} | {tps / limit:.2f} |")


if __name__ == "__main__":
    main()
