"""Sampling throughput: lathe through the tinker SDK vs transformers `generate`.

64 concurrent requests, each a 64-token prompt and 64 new tokens at temperature 1 (no stop),
on the same weights (the ~23M-parameter Qwen3-shaped model of train_throughput.py). lathe
serves them through the SDK over HTTP with continuous batching; `generate` runs them as one
batch and one request at a time. Prints generated tokens/s of each and the ratios.

    python bench/sample_throughput.py [--requests 64] [--prompt-len 64] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from train_throughput import NAME, SPEC

from lathe.local_server import LOCAL_API_KEY, LocalServer
from lathe.sampling.engine import SamplingEngine
from lathe.testing.tiny_models import make_tiny


def prompts(n: int, length: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 8000, size=(n, length)).tolist()


def bench_lathe(model_dir: Path, batch: list[list[int]], new_tokens: int) -> float:
    import tinker
    from tinker import types

    params = types.SamplingParams(max_tokens=new_tokens, temperature=1.0, stop=[])
    with tempfile.TemporaryDirectory() as tmp, LocalServer({NAME: model_dir}, Path(tmp)) as srv:
        with tinker.ServiceClient(base_url=srv.base_url, api_key=LOCAL_API_KEY) as sc:
            sampler = sc.create_sampling_client(base_model=NAME).result()
            warm = sampler.sample(types.ModelInput.from_ints(batch[0]), 1, params)
            warm.result()

            def one(i: int) -> int:
                seeded = types.SamplingParams(**{**params.model_dump(), "seed": i})
                res = sampler.sample(types.ModelInput.from_ints(batch[i]), 1, seeded).result()
                return len(res.sequences[0].tokens)

            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(len(batch)) as pool:
                generated = sum(pool.map(one, range(len(batch))))
            elapsed = time.perf_counter() - start
    assert generated == len(batch) * new_tokens, generated
    return generated / elapsed


def bench_engine(model_dir: Path, batch: list[list[int]], new_tokens: int) -> float:
    """lathe's sampling engine alone, in this process: no HTTP, no SDK, no client."""
    from lathe.engine.runner import load_base_model, weights_of
    from lathe.protocol import messages as m

    weights = weights_of(load_base_model(NAME, model_dir, torch.float32, "cpu"), None)
    engine = SamplingEngine(kv_budget_tokens=1 << 20)
    for i, prompt in enumerate(batch):
        params = m.SamplingParams(max_tokens=new_tokens, temperature=1.0, seed=i, stop_at_eos=False)
        engine.add(f"r{i}", m.SampleRequest("s", prompt, 1, params, False), weights)
    done: list = []
    start = time.perf_counter()
    while engine.has_work():
        engine.step(done.append)
    elapsed = time.perf_counter() - start
    return sum(len(d.result.sequences[0].tokens) for d in done) / elapsed


def load_hf(model_dir: Path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def generate(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=0,
    )


def bench_generate_batched(model, batch: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(batch)
    generate(model, ids[:2], 4)  # warm-up
    start = time.perf_counter()
    with torch.no_grad():
        out = generate(model, ids, new_tokens)
    elapsed = time.perf_counter() - start
    assert out.shape == (len(batch), ids.shape[1] + new_tokens)
    return len(batch) * new_tokens / elapsed


def bench_generate_one_by_one(model, batch: list[list[int]], new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for row in batch:
            generate(model, torch.tensor([row]), new_tokens)
    return len(batch) * new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--one-by-one",
        type=int,
        default=16,
        help="requests timed for the one-request-at-a-time baseline",
    )
    args = parser.parse_args()
    os.environ.setdefault("TINKER_TELEMETRY", "0")

    batch = prompts(args.requests, args.prompt_len)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny(Path(tmp) / NAME, SPEC)
        hf = load_hf(model_dir)
        batched = bench_generate_batched(hf, batch, args.new_tokens)
        single = bench_generate_one_by_one(hf, batch[: args.one_by_one], args.new_tokens)
        del hf
        engine_tps = bench_engine(model_dir, batch, args.new_tokens)
        lathe_tps = bench_lathe(model_dir, batch, args.new_tokens)

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(
        f"{args.requests} requests x ({args.prompt_len}-token prompt + {args.new_tokens} new "
        f"tokens), temperature 1"
    )
    print("| setup | generated tokens/s | lathe / setup |")
    print("|---|---:|---:|")
    print(
        f"| transformers generate, one batch of {args.requests} | {batched:,.0f} | "
        f"{lathe_tps / batched:.2f} |"
    )
    print(
        f"| transformers generate, one request at a time | {single:,.0f} | "
        f"{lathe_tps / single:.2f} |"
    )
    print(
        f"| lathe sampling engine alone, in process | {engine_tps:,.0f} | "
        f"{lathe_tps / engine_tps:.2f} |"
    )
    print(
        f"| lathe via tinker SDK, {args.requests} concurrent requests | {lathe_tps:,.0f} | 1.00 |"
    )


if __name__ == "__main__":
    main()
