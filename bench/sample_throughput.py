"""Sampling throughput: lathe through the tinker SDK vs transformers `generate`, vs the limit.

Same weights for every setup (the ~23M-parameter Qwen3-shaped model of train_throughput.py),
temperature 1, no stop. lathe serves the requests through the SDK over HTTP with continuous
batching (and, as a second row, with its sampling engine alone in this process); `generate`
runs them as one left-padded batch and one request at a time. The limit is the bare matmul
chain of one decode step (every linear layer, one `torch.mm` each) at the same batch: no
attention, no sampling, no scheduling. Prints useful generated tokens/s of each setup, its
ratio to lathe, and its fraction of the limit.

Workloads (one per run):
  --mixed (default)  64 requests, prompts of 16..128 tokens, 48..64 new tokens each
  --grpo             16 prompts of 16..128 tokens x 8 samples each, 64 new tokens
  --prompt-len N --new-tokens M   equal lengths (the original workload: 64 x (64 + 64))

    python bench/sample_throughput.py [--mixed | --grpo | --prompt-len 64 --new-tokens 64]
        [--requests N] [--one-by-one N] [--skip-sdk]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from train_throughput import NAME, SPEC

from lathe.engine.host_memory import keep_freed_memory
from lathe.local_server import LOCAL_API_KEY, LocalServer
from lathe.sampling.engine import STEP_TOKENS, SamplingEngine
from lathe.testing.tiny_models import make_tiny

VOCAB_DRAWN = 8000  # prompt token ids are drawn below this
PAD_ID = 0


# --- workloads ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """Requests as every setup gets them: request i samples `num_samples` continuations of
    `prompts[i]`, each `new_tokens[i]` tokens long."""

    description: str  # the workload line of the report
    prompts: list[list[int]]  # token ids of each request's prompt
    new_tokens: list[int]  # new tokens of each request's every sample
    num_samples: int  # sequences per request

    @property
    def sequences(self) -> int:
        """Sequences decoding at once when every request runs together: the limit's batch."""
        return len(self.prompts) * self.num_samples

    def useful_tokens(self, requests: range | None = None) -> int:
        """Generated tokens the requests asked for (padding and overshoot do not count)."""
        picked = range(len(self.prompts)) if requests is None else requests
        return sum(self.new_tokens[i] for i in picked) * self.num_samples


def random_prompts(rng: np.random.Generator, lengths) -> list[list[int]]:
    return [rng.integers(0, VOCAB_DRAWN, size=int(n)).tolist() for n in lengths]


def fixed_workload(requests: int, prompt_len: int, new_tokens: int) -> Workload:
    rng = np.random.default_rng(0)
    return Workload(
        f"{requests} requests x ({prompt_len}-token prompt + {new_tokens} new tokens), "
        "temperature 1",
        random_prompts(rng, [prompt_len] * requests),
        [new_tokens] * requests,
        1,
    )


def mixed_workload(requests: int) -> Workload:
    rng = np.random.default_rng(0)
    lengths = rng.integers(16, 129, size=requests)  # 16..128
    new = rng.integers(48, 65, size=requests)  # 48..64
    return Workload(
        f"{requests} requests, mixed: prompts of 16..128 tokens (mean {lengths.mean():.0f}), "
        f"48..64 new tokens each (mean {new.mean():.1f}), temperature 1",
        random_prompts(rng, lengths),
        new.tolist(),
        1,
    )


def grpo_workload(requests: int, num_samples: int, new_tokens: int) -> Workload:
    rng = np.random.default_rng(0)
    lengths = rng.integers(16, 129, size=requests)  # 16..128
    return Workload(
        f"GRPO: {requests} prompts of 16..128 tokens (mean {lengths.mean():.0f}) x "
        f"{num_samples} samples each, {new_tokens} new tokens, temperature 1",
        random_prompts(rng, lengths),
        [new_tokens] * requests,
        num_samples,
    )


# --- lathe ---------------------------------------------------------------------------------


def bench_lathe(model_dir: Path, work: Workload) -> float:
    """lathe through the tinker SDK over HTTP: every request a concurrent `sample` call."""
    import tinker
    from tinker import types

    with tempfile.TemporaryDirectory() as tmp, LocalServer({NAME: model_dir}, Path(tmp)) as srv:
        with tinker.ServiceClient(base_url=srv.base_url, api_key=LOCAL_API_KEY) as sc:
            sampler = sc.create_sampling_client(base_model=NAME).result()

            def one(i: int) -> int:
                params = types.SamplingParams(
                    max_tokens=work.new_tokens[i], temperature=1.0, stop=[], seed=i
                )
                prompt = types.ModelInput.from_ints(work.prompts[i])
                res = sampler.sample(prompt, work.num_samples, params).result()
                return sum(len(seq.tokens) for seq in res.sequences)

            one(0)  # warm-up
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(len(work.prompts)) as pool:
                generated = sum(pool.map(one, range(len(work.prompts))))
            elapsed = time.perf_counter() - start
    assert generated == work.useful_tokens(), (generated, work.useful_tokens())
    return generated / elapsed


def bench_engine(weights, work: Workload) -> float:
    """lathe's sampling engine alone, in this process: no HTTP, no SDK, no client."""
    from lathe.protocol import messages as m

    engine = SamplingEngine(kv_budget_tokens=1 << 20)
    for i, prompt in enumerate(work.prompts):
        params = m.SamplingParams(
            max_tokens=work.new_tokens[i], temperature=1.0, seed=i, stop_at_eos=False
        )
        engine.add(f"r{i}", m.SampleRequest("s", prompt, work.num_samples, params, False), weights)
    done: list = []
    start = time.perf_counter()
    while engine.has_work():
        engine.step(done.append)
    elapsed = time.perf_counter() - start
    generated = sum(len(seq.tokens) for d in done for seq in d.result.sequences)
    assert generated == work.useful_tokens(), (generated, work.useful_tokens())
    return generated / elapsed


# --- the limit -----------------------------------------------------------------------------


def linear_weights(model: nn.Module) -> list[torch.Tensor]:
    """(out, in) weight of every linear layer lathe runs: q/k/v/o, gate/up/down, lm_head
    (each wrapped by LoRA, its frozen layer in `.base`)."""
    return [
        mod.base.weight
        for mod in model.modules()
        if isinstance(getattr(mod, "base", None), nn.Linear)
    ]


def bench_limit(weights: list[torch.Tensor], batch: int, repeats: int = 20) -> float:
    """Tokens/s of the bare matmul chain of one decode step of `batch` sequences: one
    (B, in) x (in, out) `torch.mm` per linear layer, median step time after warm-up."""
    xs = [torch.randn(batch, w.shape[1], dtype=w.dtype, device=w.device) for w in weights]

    def step() -> float:
        start = time.perf_counter()
        for x, w in zip(xs, weights, strict=True):
            torch.mm(x, w.t())  # (B, out)
        return time.perf_counter() - start

    with torch.no_grad():
        for _ in range(3):
            step()
        times = [step() for _ in range(repeats)]
    return batch / statistics.median(times)


def bench_workload_limit(weights: list[torch.Tensor], work: Workload, repeats: int = 3) -> float:
    """Generated tokens/s of the bare matmul chain of the whole workload: every prompt token
    through the layers (in prefill chunks of STEP_TOKENS rows, the unembedding only for each
    prompt's last token) and every decode step at the batch it really has (sequences drop
    out as they reach their length). Attention, the KV cache and sampling cost nothing
    here, so no implementation can reach it; it says how far the matmuls alone allow."""
    layers, unembed = weights[:-1], weights[-1]
    prompt_tokens = sum(len(p) for p in work.prompts)
    lengths = sorted(n for n in work.new_tokens for _ in range(work.num_samples))
    batches = [sum(1 for n in lengths if n > t) for t in range(lengths[-1])]
    chunks = [STEP_TOKENS] * (prompt_tokens // STEP_TOKENS) + [prompt_tokens % STEP_TOKENS]
    chunks = [m for m in chunks if m]
    xs = {
        m: [torch.randn(m, w.shape[1], dtype=w.dtype) for w in weights]
        for m in {*chunks, *batches, len(work.prompts)}
    }

    def run() -> float:
        start = time.perf_counter()
        for m in chunks:
            for x, w in zip(xs[m], layers, strict=False):  # xs[m] also holds the unembedding's
                torch.mm(x, w.t())
        torch.mm(xs[len(work.prompts)][-1], unembed.t())  # each prompt's first token
        for m in batches:
            for x, w in zip(xs[m], weights, strict=True):
                torch.mm(x, w.t())
        return time.perf_counter() - start

    with torch.no_grad():
        run()
        best = min(run() for _ in range(repeats))
    return work.useful_tokens() / best


# --- transformers generate ------------------------------------------------------------------


def load_hf(model_dir: Path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (N, longest): prompts right-aligned, PAD_ID before."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = torch.tensor(p)
        mask[i, longest - len(p) :] = 1
    return ids, mask


def generate(model, prompts: list[list[int]], new_tokens: int, num_samples: int) -> torch.Tensor:
    """`num_samples` continuations of each prompt, exactly `new_tokens` long, one batch."""
    ids, mask = left_padded(prompts)
    return model.generate(
        ids,
        attention_mask=mask,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        num_return_sequences=num_samples,
        pad_token_id=PAD_ID,
    )


def bench_generate_batched(model, work: Workload) -> float:
    """All requests as one left-padded batch, decoded to the longest request's new tokens;
    only each request's own new tokens count."""
    new_tokens = max(work.new_tokens)
    with torch.no_grad():
        generate(model, work.prompts[:2], 4, work.num_samples)  # warm-up
        start = time.perf_counter()
        out = generate(model, work.prompts, new_tokens, work.num_samples)
        elapsed = time.perf_counter() - start
    longest = max(len(p) for p in work.prompts)
    assert out.shape == (work.sequences, longest + new_tokens), out.shape
    return work.useful_tokens() / elapsed


def bench_generate_one_by_one(model, work: Workload, requests: int) -> float:
    """The first `requests` requests one after another, each unpadded, its own new tokens."""
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(requests):
            generate(model, [work.prompts[i]], work.new_tokens[i], work.num_samples)
    return work.useful_tokens(range(requests)) / (time.perf_counter() - start)


# --- report --------------------------------------------------------------------------------


def print_table(rows: list[tuple[str, float]], reference: str, limit: float) -> None:
    """rows: (setup, tokens/s); `reference` names the row the ratio column divides by."""
    ref_tps = dict(rows)[reference]
    print(f"| setup | useful generated tokens/s | {reference.split(',')[0]} / setup | of limit |")
    print("|---|---:|---:|---:|")
    for name, tps in rows:
        print(f"| {name} | {tps:,.0f} | {ref_tps / tps:.2f} | {tps / limit:.2f} |")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--mixed", action="store_true", help="mixed lengths (the default)")
    kind.add_argument("--grpo", action="store_true", help="prompts x num_samples, as GRPO")
    parser.add_argument("--prompt-len", type=int, help="equal-length workload: prompt tokens")
    parser.add_argument(
        "--new-tokens", type=int, help="equal-length workload (or --grpo): new tokens"
    )
    parser.add_argument("--requests", type=int, help="requests (default 64; --grpo: 16)")
    parser.add_argument("--num-samples", type=int, default=8, help="--grpo: samples per prompt")
    parser.add_argument(
        "--one-by-one",
        type=int,
        help="requests timed for the one-request-at-a-time baseline (default 16; --grpo: 4)",
    )
    parser.add_argument("--skip-sdk", action="store_true", help="skip the SDK (server) row")
    args = parser.parse_args()
    if args.mixed and (args.prompt_len or args.new_tokens):
        parser.error("--mixed draws its own lengths; drop --prompt-len/--new-tokens")
    if args.grpo and args.prompt_len:
        parser.error("--grpo draws its own prompt lengths; drop --prompt-len")
    return args


def workload_of(args: argparse.Namespace) -> Workload:
    if args.grpo:
        return grpo_workload(args.requests or 16, args.num_samples, args.new_tokens or 64)
    if args.prompt_len or args.new_tokens:
        return fixed_workload(args.requests or 64, args.prompt_len or 64, args.new_tokens or 64)
    return mixed_workload(args.requests or 64)


def main() -> None:
    from lathe.engine.runner import load_base_model, weights_of

    args = parse_args()
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    work = workload_of(args)
    one_by_one = min(args.one_by_one or (4 if args.grpo else 16), len(work.prompts))
    n = len(work.prompts)
    batch_name = f"{n} prompts x {work.num_samples}" if work.num_samples > 1 else f"{n}"

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny(Path(tmp) / NAME, SPEC)
        hf = load_hf(model_dir)
        batched = bench_generate_batched(hf, work)
        single = bench_generate_one_by_one(hf, work, one_by_one)
        del hf
        base = load_base_model(NAME, model_dir, torch.float32, "cpu")
        linears = linear_weights(base.module)
        limit = bench_limit(linears, work.sequences)
        workload_limit = bench_workload_limit(linears, work)
        keep_freed_memory()  # as `lathe serve` does (engine/host_memory.py); generate ran without
        engine_tps = bench_engine(weights_of(base, None), work)
        del base
        lathe_tps = None if args.skip_sdk else bench_lathe(model_dir, work)

    rows = [
        (f"limit: bare matmul chain of a decode step, B = {work.sequences}", limit),
        ("workload limit: bare matmul chain of all its prefill and decode", workload_limit),
        (f"transformers generate, one padded batch of {batch_name}", batched),
        (f"transformers generate, one request at a time ({one_by_one} timed)", single),
        ("lathe sampling engine alone, in process", engine_tps),
    ]
    if lathe_tps is not None:
        rows.append((f"lathe via tinker SDK, {n} concurrent requests", lathe_tps))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(work.description)
    print_table(rows, rows[-1][0], limit)


if __name__ == "__main__":
    main()
