"""lathe's engine on a GPU, against the hardware: training MFU, co-batched adapters, decode
bandwidth, peak memory, and a logits check against transformers.

Random-weight models of real shapes are built in GPU memory (Qwen3-8B and Qwen3-0.6B
configs; nothing is downloaded): `transformers` initialises the weights, lathe's model holds
the very same tensors (the loading path of every served model, `models/loading.py`), and
lathe's engine runs in this process:

- logits: lathe's log-softmax against transformers' on the same weights and input
- training: forward_backward + optim_step of one rank-32 adapter at `--train-tokens` tokens
  per step (datums of 4,096 tokens). MFU = model FLOPs / time / the GPU's dense bf16 peak,
  model FLOPs = 4 * N * tokens (frozen-base LoRA: forward 2N and input gradients 2N per
  token, N the linear layers' weights; no weight gradients) + causal attention (forward
  2 * 2 * T^2 / 2 * heads * head_dim per layer and datum, backward twice that)
- co-batching: 8 adapters with an eighth of the tokens each, as one co-batch, against one
  adapter with all of them
- decode: generated tokens/s at batch 1 and 64 (128-token prompts, 128 new tokens), and the
  fraction of HBM bandwidth: bytes read per step (every linear weight, plus the KV cache
  read) over the step's time, over the GPU's peak bandwidth
- peak memory: torch.cuda.max_memory_allocated over each model's run

    python bench/gpu.py [--models qwen3-8b,qwen3-0.6b] [--train-tokens 16384]
    python bench/gpu.py --smoke   # tiny shapes on the CPU in seconds: checks the script only
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lathe.engine.runner import Runner, base_model_of, weights_of
from lathe.models.loading import build_model
from lathe.protocol import messages as m
from lathe.sampling.engine import SamplingEngine

QWEN3 = {"model_type": "qwen3", "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6}
CONFIGS = {
    "qwen3-8b": {
        **QWEN3,
        "vocab_size": 151_936,
        "hidden_size": 4096,
        "intermediate_size": 12_288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": False,
        "max_position_embeddings": 40_960,
    },
    "qwen3-0.6b": {
        **QWEN3,
        "vocab_size": 151_936,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": True,
        "max_position_embeddings": 40_960,
    },
    "tiny": {  # --smoke
        **QWEN3,
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "tie_word_embeddings": True,
        "max_position_embeddings": 4096,
    },
}
# name fragment -> (dense bf16 FLOP/s, HBM bytes/s), from the vendors' data sheets; the
# first fragment found in the device's name wins
PEAKS = {
    "H200": (989e12, 4.8e12),
    "H100 PCIe": (756e12, 2.0e12),
    "H100": (989e12, 3.35e12),
    "A100": (312e12, 2.0e12),
}
RANK = 32  # Tinker's default LoRA rank
DATUM_TOKENS = 4096
PROMPT, NEW_TOKENS = 128, 128


@dataclass(frozen=True)
class Machine:
    device: str
    name: str
    flops: float | None  # dense bf16 peak, FLOP/s
    bandwidth: float | None  # memory, bytes/s

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


def machine(smoke: bool) -> Machine:
    if smoke:
        return Machine("cpu", platform.processor() or platform.machine(), None, None)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run it on a GPU, or with --smoke to check the script")
    name = torch.cuda.get_device_name(0)
    peak = next((p for fragment, p in PEAKS.items() if fragment in name), (None, None))
    return Machine("cuda:0", name, *peak)


def build(name: str, dtype: torch.dtype, device: str):
    """(lathe's served base model, transformers' model) sharing one set of random weights."""
    import transformers

    cfg = CONFIGS[name]
    hf_cfg = transformers.Qwen3Config(**{k: v for k, v in cfg.items() if k != "model_type"})
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype).eval()
    loaded = build_model(cfg, hf.state_dict(), dtype, device, Path(tempfile.mkdtemp()))
    return base_model_of(name, loaded, compiled=device.startswith("cuda")), hf


def logits_check(base, hf, device: str) -> float:
    """max |log-softmax difference| of lathe and transformers on one 64-token input."""
    ids = torch.randint(0, CONFIGS[base.name]["vocab_size"], (1, 64), device=device)
    with torch.no_grad():
        ours = torch.log_softmax(base.module(ids).float(), dim=-1)
        theirs = torch.log_softmax(hf(input_ids=ids).logits.float(), dim=-1)
    return float((ours - theirs).abs().max())


def linear_params(module: torch.nn.Module) -> int:
    """N: the weights of every linear layer (the unembedding's included)."""
    return sum(
        mod.base.weight.numel()
        for mod in module.modules()
        if isinstance(getattr(mod, "base", None), torch.nn.Linear)
    )


def attention_flops(cfg: dict, lengths: list[int]) -> float:
    """Causal attention of a training step: forward 2 matmuls of 2*T^2/2*d per head and
    layer, backward twice the forward."""
    per_layer = sum(2 * 2 * t * t / 2 for t in lengths) * cfg["num_attention_heads"]
    return 3 * per_layer * cfg["head_dim"] * cfg["num_hidden_layers"]


def datums(cfg: dict, tokens: int, seed: int) -> list[m.Datum]:
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, tokens, DATUM_TOKENS):
        n = min(DATUM_TOKENS, tokens - start)
        row = rng.integers(0, cfg["vocab_size"], n + 1)
        out.append(m.Datum(row[:-1].tolist(), {"target_tokens": row[1:].astype(np.int64)}))
    return out


def train_seconds(runner: Runner, hw: Machine, work: dict[str, list[m.Datum]], steps: int):
    """Median seconds of one step (forward_backward of every model's datums, co-batched,
    then each model's optim_step)."""
    seq = dict.fromkeys(work, 0)

    def step() -> float:
        hw.sync()
        start = time.perf_counter()
        batch = []
        for model, data in work.items():
            seq[model] += 1
            req = m.ForwardBackwardRequest(model, seq[model], data, "cross_entropy", {}, False)
            batch.append(m.Work(f"{model}/{seq[model]}", req, tenant=model))
        done = runner.execute_co_batch(batch) if len(batch) > 1 else [runner.run_one(batch[0])]
        assert all(d.error is None for d in done), [d.error for d in done]
        for model in work:
            seq[model] += 1
            req = m.OptimStepRequest(model, seq[model], m.AdamParams(1e-5))
            assert runner.run_one(m.Work(f"{model}/{seq[model]}", req)).error is None
        hw.sync()
        return time.perf_counter() - start

    step()  # warm-up (and, with torch.compile, compiling)
    step()
    return statistics.median(step() for _ in range(steps))


def decode(base, hw: Machine, batch: int) -> tuple[float, float]:
    """(generated tokens/s, fraction of peak bandwidth) of the decode steps of `batch`
    sequences after their prefill."""
    cfg = CONFIGS[base.name]
    engine = SamplingEngine(kv_budget_tokens=batch * (PROMPT + NEW_TOKENS + 128))
    rng = np.random.default_rng(batch)
    for i in range(batch):
        params = m.SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, seed=i, stop_at_eos=False)
        prompt = rng.integers(0, cfg["vocab_size"], PROMPT).tolist()
        engine.add(f"r{i}", m.SampleRequest("s", prompt, 1, params, False), weights_of(base, None))
    done: list = []
    while any(job.prefilling for job in engine.jobs):  # prefill, and the first tokens
        engine.step(done.append)
    engine.step(done.append)
    hw.sync()
    before, start, steps = engine.tokens_sampled, time.perf_counter(), 0
    while engine.has_work():
        engine.step(done.append)
        steps += 1
    hw.sync()
    seconds = time.perf_counter() - start
    generated = engine.tokens_sampled - before
    if hw.bandwidth is None or steps == 0:
        return generated / seconds, math.nan
    weight_bytes = sum(
        mod.base.weight.numel() * mod.base.weight.element_size()
        for mod in base.module.modules()
        if isinstance(getattr(mod, "base", None), torch.nn.Linear)
    )
    element = next(base.module.parameters()).element_size()
    kv_per_position = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"]
    mean_context = PROMPT + NEW_TOKENS / 2
    kv_bytes = batch * mean_context * kv_per_position * element
    return generated / seconds, (weight_bytes + kv_bytes) * steps / seconds / hw.bandwidth


def record(out: dict, hw: Machine, keys: tuple[str, ...], measure) -> None:
    """out[keys] = measure(); a measure that fails shows its error in the table and the run
    goes on (a GPU session is short: one run must bring back all it can)."""
    try:
        values = measure()
    except Exception as e:  # noqa: BLE001 - reported in the table
        values = [f"failed: {type(e).__name__}: {str(e)[:80]}"] * len(keys)
        if hw.device.startswith("cuda"):
            torch.cuda.empty_cache()
    out.update(zip(keys, values, strict=True))


def run(name: str, hw: Machine, train_tokens: int, steps: int, checkpoint_above: int) -> dict:
    """Every measure of one model."""
    dtype = torch.float32 if hw.device == "cpu" else torch.bfloat16
    if hw.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base, hf = build(name, dtype, hw.device)
    cfg = CONFIGS[name]
    out: dict = {}
    logits = ("logits: max abs log-softmax difference to transformers",)
    record(out, hw, logits, lambda: [logits_check(base, hf, hw.device)])
    hf = None  # lathe's model keeps the weights
    runner = Runner({name: base}, token_budget=train_tokens, checkpoint_tokens=checkpoint_above)
    for i in range(8):
        create = m.CreateModelRequest(f"m{i}", name, m.LoraConfig(rank=RANK), seed=i)
        assert runner.run_one(m.Work(f"c{i}", create)).error is None

    def one_adapter() -> list[float]:
        one = {"m0": datums(cfg, train_tokens, 0)}
        seconds = train_seconds(runner, hw, one, steps)
        lengths = [len(d.tokens) for d in one["m0"]]
        flops = 4 * linear_params(base.module) * train_tokens + attention_flops(cfg, lengths)
        return [train_tokens / seconds, flops / seconds / hw.flops if hw.flops else math.nan]

    def eight_adapters() -> list[float]:
        eighth = max(1, train_tokens // 8)
        eight = {f"m{i}": datums(cfg, eighth, i) for i in range(8)}
        return [8 * eighth / train_seconds(runner, hw, eight, steps)]

    record(out, hw, ("train tokens/s, 1 adapter", "train MFU"), one_adapter)
    record(out, hw, ("train tokens/s, 8 adapters co-batched",), eight_adapters)
    for batch in (1, 64) if hw.device != "cpu" else (1, 4):
        keys = (
            f"decode tokens/s, batch {batch}",
            f"decode fraction of HBM bandwidth, batch {batch}",
        )
        record(out, hw, keys, lambda batch=batch: decode(base, hw, batch))
    if hw.device.startswith("cuda"):
        out["peak memory GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="qwen3-8b,qwen3-0.6b")
    parser.add_argument("--train-tokens", type=int, default=16_384)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    parser.add_argument(
        "--checkpoint-activations-above",
        type=int,
        default=None,
        help="as lathe serve's flag (default: off on GPUs of 100 GiB or more, else 8192)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    args = parser.parse_args()
    hw = machine(args.smoke)
    models = ["tiny"] if args.smoke else args.models.split(",")
    train_tokens = 256 if args.smoke else args.train_tokens
    checkpoint_above = args.checkpoint_activations_above
    if checkpoint_above is None:
        big = hw.device.startswith("cuda") and torch.cuda.get_device_properties(0).total_memory
        checkpoint_above = train_tokens if big and big >= 100 * 2**30 else 8192
    print(f"device: {hw.name}; torch {torch.__version__}; {train_tokens} training tokens/step")
    print(f"activation checkpointing above {checkpoint_above} tokens per micro-batch")
    results = {name: run(name, hw, train_tokens, args.steps, checkpoint_above) for name in models}
    print("| measure | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for key in next(iter(results.values())):
        cells = []
        for r in results.values():
            v = r.get(key, "-")
            if isinstance(v, str):
                cells.append(v)
            elif math.isnan(v):
                cells.append("n/a")
            else:
                cells.append(f"{v:.2%}" if "MFU" in key or "fraction" in key else f"{v:,.4g}")
        print(f"| {key} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
