"""`--compile`: the decoder's elementwise parts fused by torch.compile give the eager numbers
(training and sampling), keep sampling batch-invariant, and compile a bounded number of
graphs however the batch size varies. Off (the CPU default), nothing is compiled."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from lathe.engine.runner import load_base_model
from lathe.models import fused
from lathe.models.decoder import MLP, Attention, RMSNorm
from lathe.protocol import messages as m
from lathe.sampling.engine import SamplingEngine, Weights

from reference import make_runner

pytestmark = pytest.mark.slow  # compiling takes ~10 s on the first call


@pytest.fixture(scope="module")
def eager(tiny_qwen3):
    return load_base_model("tiny", tiny_qwen3, torch.float32, "cpu")


@pytest.fixture(scope="module")
def compiled(tiny_qwen3):
    return load_base_model("tiny", tiny_qwen3, torch.float32, "cpu", compiled=True)


def request(prompt_len: int, seed: int, n: int = 1) -> m.SampleRequest:
    prompt = np.random.default_rng(seed).integers(3, 500, prompt_len).tolist()
    params = m.SamplingParams(max_tokens=6, temperature=1.0, seed=seed, stop_at_eos=False)
    return m.SampleRequest("s", prompt, n, params, False)


def sample(base, requests: dict[str, m.SampleRequest]) -> dict[str, m.SampleResult]:
    engine = SamplingEngine(1 << 16)
    for work_id, req in requests.items():
        engine.add(work_id, req, Weights(base.module, None, base.vocab, "tiny"))
    done: dict[str, m.Done] = {}
    while engine.has_work():
        engine.step(lambda d: done.__setitem__(d.request_id, d))
    return {k: d.result for k, d in done.items()}


def test_setting_compiles_on_cuda_by_default_and_on_request_only():
    assert not fused.compile_wanted("auto", "cpu")
    assert fused.compile_wanted("auto", "cuda:0")
    assert fused.compile_wanted("on", "cpu")
    assert not fused.compile_wanted("off", "cuda:0")


def test_off_leaves_every_part_eager_and_on_replaces_them(eager, compiled):
    for module in eager.module.modules():
        if isinstance(module, RMSNorm):
            assert module.rms_norm is fused.rms_norm
        if isinstance(module, Attention):
            assert module.rope is fused.rope
        if isinstance(module, MLP):
            assert module.swiglu is fused.swiglu
    norms = [mod for mod in compiled.module.modules() if isinstance(mod, RMSNorm)]
    assert norms and all(mod.rms_norm is not fused.rms_norm for mod in norms)
    mlps = [mod for mod in compiled.module.modules() if isinstance(mod, MLP)]
    assert mlps and all(mod.swiglu is not fused.swiglu for mod in mlps)


def test_compiled_sampling_equals_eager_and_is_the_same_alone_and_co_batched(eager, compiled):
    target = request(21, seed=42, n=2)
    others = {f"other{i}": request(5 + 9 * i, seed=i, n=1 + i % 3) for i in range(5)}
    want = sample(eager, {"t": target})["t"]
    alone = sample(compiled, {"t": target})["t"]
    together = sample(compiled, {**others, "t": target})["t"]
    for w, a, b in zip(want.sequences, alone.sequences, together.sequences, strict=True):
        assert w.tokens == a.tokens == b.tokens
        np.testing.assert_allclose(a.logprobs, w.logprobs, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(a.logprobs, b.logprobs)  # batch-invariant, bitwise


def test_compiled_training_gives_the_eager_loss_and_gradients(tiny_qwen3):
    results = {}
    for compiled_parts in (False, True):
        runner, adapter = make_runner(tiny_qwen3, compiled=compiled_parts)
        rng = np.random.default_rng(0)
        data = [
            m.Datum(
                rng.integers(0, 500, n).tolist(),
                {
                    "target_tokens": rng.integers(0, 500, n).astype(np.int64),
                    "weights": np.ones(n, np.float32),
                },
            )
            for n in (7, 12, 3)
        ]
        req = m.ForwardBackwardRequest("s:train:0", 1, data, "cross_entropy", {}, False)
        done = runner.run_one(m.Work("r1", req))
        assert done.error is None, done.error
        results[compiled_parts] = (
            done.result.metrics["loss:sum"],
            {k: v.grad.clone() for k, v in adapter.a.items()},
        )
    (loss_eager, grads_eager), (loss_compiled, grads_compiled) = results[False], results[True]
    assert loss_compiled == pytest.approx(loss_eager, rel=1e-6)
    for name, g in grads_eager.items():
        assert g.abs().max() > 0, name
        err = float((grads_compiled[name] - g).norm() / g.norm())
        assert err < 1e-5, (name, err)


def test_recompiles_stay_bounded_as_the_batch_size_varies(compiled):
    sample(compiled, {"warm": request(9, seed=0)})
    before = counters["stats"]["unique_graphs"]
    for batch in (1, 2, 3, 5, 8, 13):
        sample(compiled, {f"r{i}": request(4 + 7 * i, seed=i) for i in range(batch)})
    # One dynamic graph per function serves every token count; at most the size-1
    # specialisation of each of the three functions can still be new here.
    assert counters["stats"]["unique_graphs"] - before <= 3
