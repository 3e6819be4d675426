"""The continuous-batching sampler: batch invariance, joining and leaving, prefix sharing,
chunked prefill and the KV budget. In-process, stepping the engine by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lathe.engine.loop import Engine
from lathe.engine.runner import Runner, load_base_model
from lathe.models.lora import LoraConfig, new_adapter
from lathe.protocol import messages as m
from lathe.sampling import engine as sampling
from lathe.sampling.budget import BLOCK, blocks_needed
from lathe.sampling.engine import SamplingEngine, Weights


@pytest.fixture(scope="module")
def base(tiny_qwen3):
    return load_base_model("tiny", tiny_qwen3, torch.float32, "cpu")


def adapter_for(base, seed: int):
    """A LoRA adapter with random A and B, so it really changes the outputs."""
    a = new_adapter(base.module, LoraConfig(rank=4), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in a.b.values():
            b.copy_(torch.randn(b.shape, generator=gen) * 0.2)
    return a.frozen_copy()


def request(prompt, n=1, max_tokens=8, seed=1, temperature=1.0, **kw) -> m.SampleRequest:
    params = m.SamplingParams(
        max_tokens=max_tokens, temperature=temperature, seed=seed, stop_at_eos=False
    )
    return m.SampleRequest("s", prompt, n, params, False, **kw)


def run_all(
    engine: SamplingEngine,
    jobs: list[tuple[str, m.SampleRequest, Weights]],
    max_steps: int = 10_000,
) -> dict[str, m.SampleResult]:
    for job in jobs:
        engine.add(*job)
    done: dict[str, m.Done] = {}
    steps = 0
    while engine.has_work():
        engine.step(lambda d: done.__setitem__(d.request_id, d))
        steps += 1
        assert steps < max_steps
    assert all(d.error is None for d in done.values()), [d.error for d in done.values()]
    return {k: d.result for k, d in done.items()}


def prompt_of(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 500, n).tolist()


def test_a_request_samples_the_same_alone_and_among_seven_others(base):
    target = (
        "target",
        request(prompt_of(0, 21), n=2, max_tokens=12, seed=42),
        Weights(base.module, adapter_for(base, 1), base.vocab, "tiny"),
    )
    alone = run_all(SamplingEngine(1 << 16), [target])["target"]
    others = [
        (
            f"other{i}",
            request(prompt_of(10 + i, 5 + 9 * i), n=1 + i % 3, max_tokens=4 + 3 * i, seed=i),
            Weights(
                base.module, adapter_for(base, 2 + i % 3) if i % 4 else None, base.vocab, "tiny"
            ),
        )
        for i in range(7)
    ]
    # the others start first, so the target joins a running batch mid-way
    engine = SamplingEngine(1 << 16)
    for job in others[:4]:
        engine.add(*job)
    engine.step(lambda d: None)
    engine.step(lambda d: None)
    together = run_all(engine, [*others[4:], target])["target"]
    for a, b in zip(alone.sequences, together.sequences, strict=True):
        assert a.tokens == b.tokens
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-6)


def test_new_requests_join_and_finished_ones_leave_at_once(base):
    weights = Weights(base.module, None, base.vocab, "tiny")
    engine = SamplingEngine(1 << 16)
    engine.add("long", request(prompt_of(1, 10), max_tokens=40), weights)
    finished: list[str] = []
    for _ in range(5):
        engine.step(lambda d: finished.append(d.request_id))
    engine.add("short", request(prompt_of(2, 10), max_tokens=3), weights)
    steps = 0
    while "short" not in finished:
        engine.step(lambda d: finished.append(d.request_id))
        steps += 1
    assert steps <= 4 and finished == ["short"]  # done while "long" is still decoding
    assert len(engine.jobs) == 1 and engine.jobs[0].work_id == "long"


def test_prompt_is_prefilled_once_for_many_samples_and_reused(base):
    weights = Weights(base.module, None, base.vocab, "tiny")
    engine = SamplingEngine(1 << 16)
    prompt = prompt_of(3, 40)
    first = run_all(engine, [("a", request(prompt, n=8, max_tokens=3), weights)])["a"]
    assert engine.prefill_tokens_computed == 40  # not 8 x 40
    assert first.prompt_cache_hit_tokens == 0 and len(first.sequences) == 8
    again = run_all(engine, [("b", request(prompt, n=2, max_tokens=3, seed=1), weights)])["b"]
    assert again.prompt_cache_hit_tokens == 40 and engine.prefill_tokens_computed == 40
    assert again.sequences[0].tokens == first.sequences[0].tokens  # same seed, same weights
    other = Weights(base.module, adapter_for(base, 5), base.vocab, "tiny")
    third = run_all(engine, [("c", request(prompt, n=1, max_tokens=3), other)])["c"]
    assert third.prompt_cache_hit_tokens == 0  # other weights: nothing to reuse


def test_long_prompts_are_prefilled_in_chunks_alongside_decoding(base, monkeypatch):
    monkeypatch.setattr(sampling, "PREFILL_CHUNK", 16)
    weights = Weights(base.module, None, base.vocab, "tiny")
    engine = SamplingEngine(1 << 16)
    engine.add("decoding", request(prompt_of(4, 8), max_tokens=30), weights)
    engine.step(lambda d: None)
    engine.add("long", request(prompt_of(5, 100), max_tokens=2), weights)
    decoding = engine.jobs[0].sequences[0]
    for _ in range(3):  # the 100-token prompt takes 7 steps; decoding goes on meanwhile
        before = len(decoding.tokens)
        engine.step(lambda d: None)
        assert len(decoding.tokens) == before + 1
        assert engine.jobs[1].prefilling
    # chunked prefill gives the same result as a prefill in one piece
    monkeypatch.setattr(sampling, "PREFILL_CHUNK", 1000)
    whole = run_all(
        SamplingEngine(1 << 16), [("w", request(prompt_of(5, 100), max_tokens=2), weights)]
    )["w"]
    chunked = run_all(engine, [])
    assert chunked["long"].sequences[0].tokens == whole.sequences[0].tokens
    np.testing.assert_allclose(
        chunked["long"].sequences[0].logprobs, whole.sequences[0].logprobs, atol=1e-5
    )


def test_requests_wait_for_kv_memory_instead_of_failing(base):
    """The engine's scheduler admits what fits the KV budget; the rest waits, paused."""
    one = blocks_needed(request(prompt_of(6, 10), n=2, max_tokens=20)) * BLOCK
    runner = Runner({"tiny": base}, kv_budget_tokens=one + one // 2)  # room for one at a time
    engine = Engine(runner)
    engine.submit(m.Work("make", m.CreateSamplerRequest("s", "tiny", None)))
    for i in range(3):
        req = request(prompt_of(6 + i, 10), n=2, max_tokens=20, base_model="tiny")
        engine.submit(m.Work(f"r{i}", req))
    huge = request(prompt_of(9, 10), max_tokens=one, base_model="tiny")
    engine.submit(m.Work("huge", huge))
    engine._drain(block=False)
    done: dict[str, m.Done] = {}
    running_at_once = 0
    while engine.step():
        running_at_once = max(running_at_once, len(runner.sampling.jobs))
        while not engine.outbox.empty():
            d = engine.outbox.get()
            done[d.request_id] = d
        if "r0" not in done:
            assert engine.paused_for_capacity == {"r1", "r2"}
    assert running_at_once == 1
    assert all(done[f"r{i}"].error is None for i in range(3))
    assert "KV positions" in done["huge"].error


def test_a_request_served_entirely_from_the_prefix_cache(base):
    """compute_logprobs-like requests (max_tokens=1) of a cached prompt need no forward."""
    weights = Weights(base.module, None, base.vocab, "tiny")
    engine = SamplingEngine(1 << 16)
    prompt = prompt_of(8, 12)
    first = run_all(engine, [("a", request(prompt, max_tokens=1, temperature=0), weights)])["a"]
    again = run_all(engine, [("b", request(prompt, max_tokens=1, temperature=0), weights)])["b"]
    assert again.prompt_cache_hit_tokens == 12
    assert again.sequences[0].tokens == first.sequences[0].tokens


def test_samples_share_prompt_blocks_and_everything_is_given_back(base):
    weights = Weights(base.module, None, base.vocab, "tiny")
    engine = SamplingEngine(1 << 16, prefix_cache_entries=0)  # no cache: all blocks return
    prompt = prompt_of(11, 3 * BLOCK + 5)  # 4 blocks, the last one partly filled
    engine.add("a", request(prompt, n=8, max_tokens=10), weights)
    memory = engine.memory_of(base.module)
    engine.step(lambda d: None)  # the prompt's prefill; the forks share its 4 blocks
    assert memory.capacity - memory.pool.num_free == 4
    engine.step(lambda d: None)  # the first decode writes: the partly filled block is copied
    assert memory.capacity - memory.pool.num_free == 4 + 7  # per fork but the last one
    run_all(engine, [])
    assert memory.pool.num_free == memory.capacity and memory.reserved == 0


def test_bfloat16_weights_sample_with_fp32_softmax_close_to_float32(base, tiny_qwen3):
    """A bf16 base model (the GPU default) samples through prefill chunks and decode steps,
    with an adapter; its logprobs stay close to the fp32 model's."""
    bf16 = load_base_model("tiny", tiny_qwen3, torch.bfloat16, "cpu")
    results = {}
    for name, model in (("fp32", base), ("bf16", bf16)):
        adapter = adapter_for(model, 3)
        req = request(prompt_of(5, 300), n=2, max_tokens=6, seed=9, topk_sample_logprobs=3)
        weights = Weights(model.module, adapter, model.vocab, "tiny")
        results[name] = run_all(SamplingEngine(1 << 16), [("r", req, weights)])["r"]
    for a, b in zip(results["bf16"].sequences, results["fp32"].sequences, strict=True):
        assert len(a.tokens) == 6
        np.testing.assert_allclose(a.topk.logprobs[0], b.topk.logprobs[0], atol=0.1)


def test_prompt_scores_over_several_prefill_chunks_equal_one_chunk(base, monkeypatch):
    """Prompt logprobs, their top-k and target scores are kept per chunk on the device and
    fetched when the request finishes: split into chunks they equal one piece."""
    prompt = prompt_of(8, 50)
    targets = np.random.default_rng(0).integers(-1, 500, (49, 2)).astype(np.int64)
    weights = Weights(base.module, adapter_for(base, 2), base.vocab, "tiny")
    results = []
    for chunk in (16, 1000):
        monkeypatch.setattr(sampling, "PREFILL_CHUNK", chunk)
        req = m.SampleRequest(
            "s",
            prompt,
            1,
            m.SamplingParams(max_tokens=2, temperature=1.0, seed=3, stop_at_eos=False),
            True,
            topk_prompt_logprobs=3,
            target_prompt_ids=targets,
        )
        results.append(run_all(SamplingEngine(1 << 16), [("r", req, weights)])["r"])
    chunked, whole = results
    assert len(chunked.prompt_logprobs) == 50 and np.isnan(chunked.prompt_logprobs[0])
    np.testing.assert_allclose(chunked.prompt_logprobs[1:], whole.prompt_logprobs[1:], atol=1e-5)
    assert chunked.prompt_topk.token_ids.shape == (50, 3)
    assert chunked.prompt_topk.token_ids.tolist() == whole.prompt_topk.token_ids.tolist()
    np.testing.assert_allclose(chunked.prompt_topk.logprobs, whole.prompt_topk.logprobs, atol=1e-5)
    assert chunked.target_prompt_logprobs.shape == (49, 2)
    np.testing.assert_allclose(
        chunked.target_prompt_logprobs, whole.target_prompt_logprobs, atol=1e-5
    )
    assert np.all(chunked.target_prompt_logprobs[targets < 0] == 0)
