"""The CUDA path: bf16 base weights with fp32 adapters and optimizer state, results equal to
the CPU's within bf16 tolerance, and no wait for the device inside a step except its one
transfer of results (CUDA's sync debug mode turns any other into an error).

The tests marked `gpu` are skipped where torch sees no CUDA device (conftest.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lathe.engine.runner import Runner, load_base_model, torch_dtype, weights_of
from lathe.protocol import messages as m
from lathe.protocol.messages import LoraConfig
from lathe.sampling.engine import SamplingEngine

from test_training_numerics import random_batch

gpu = pytest.mark.gpu
CUDA = "cuda:0"


def runner_on(folder, device: str, dtype: torch.dtype) -> Runner:
    runner = Runner({"tiny": load_base_model("tiny", folder, dtype, device)})
    req = m.CreateModelRequest("s:train:0", "tiny", LoraConfig(rank=4), seed=0)
    assert runner.run_one(m.Work("c", req)).error is None
    return runner


def fb(seq: int, data, forward_only: bool = False) -> m.Work:
    req = m.ForwardBackwardRequest("s:train:0", seq, data, "cross_entropy", {}, forward_only)
    return m.Work(f"f{seq}", req)


@pytest.fixture
def no_hidden_syncs():
    """Any wait for the device raises, except models/transfer.py's declared one."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_auto_dtype_is_bfloat16_on_a_gpu_and_float32_on_a_cpu():
    assert torch_dtype("auto", CUDA) == torch.bfloat16
    assert torch_dtype("auto", "cpu") == torch.float32


@gpu
def test_training_keeps_fp32_adapters_on_the_gpu_and_matches_the_cpu(hf_folder):
    data = random_batch(3)
    cpu = runner_on(hf_folder, "cpu", torch.float32)
    gpu = runner_on(hf_folder, CUDA, torch.bfloat16)
    want = cpu.run_one(fb(1, data)).result
    got = gpu.run_one(fb(1, data)).result
    adapter = gpu.models["s:train:0"].adapter
    for _, _, t in adapter.named_tensors():
        assert t.device.type == "cuda" and t.dtype == torch.float32
        assert t.grad is not None and t.grad.dtype == torch.float32
    for a, b in zip(got.outputs, want.outputs, strict=True):
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=0.1)
    assert got.metrics["loss:sum"] == pytest.approx(want.metrics["loss:sum"], rel=0.02)
    done = gpu.run_one(m.Work("o", m.OptimStepRequest("s:train:0", 2, m.AdamParams(1e-3))))
    assert done.error is None
    state = gpu.models["s:train:0"].optimizer.state_tensors()
    assert state and all(v.dtype == torch.float32 for k, v in state.items() if "exp_avg" in k)


@gpu
def test_a_training_step_waits_for_the_device_only_for_its_results(hf_folder, no_hidden_syncs):
    gpu = runner_on(hf_folder, CUDA, torch.bfloat16)
    for seq, data in ((1, random_batch(0)), (3, random_batch(1))):
        done = gpu.run_one(fb(seq, data))
        assert done.error is None, done.error
        done = gpu.run_one(m.Work("o", m.OptimStepRequest("s:train:0", seq + 1, m.AdamParams())))
        assert done.error is None, done.error


@gpu
def test_sampling_on_the_gpu_waits_only_for_each_steps_tokens(hf_folder, no_hidden_syncs):
    base = load_base_model("tiny", hf_folder, torch.bfloat16, CUDA)
    engine = SamplingEngine(1 << 14)
    for i in range(3):
        params = m.SamplingParams(max_tokens=8, temperature=1.0, seed=i, stop_at_eos=False)
        req = m.SampleRequest("s", list(range(3, 12 + 5 * i)), 2, params, False)
        engine.add(f"r{i}", req, weights_of(base, None))
    done: list[m.Done] = []
    while engine.has_work():
        engine.step(done.append)
    assert len(done) == 3
    assert all(len(s.tokens) == 8 for d in done for s in d.result.sequences)


@gpu
def test_sampled_logprobs_on_the_gpu_match_the_cpu(hf_folder):
    """fp32 weights on both: the first token's distribution agrees closely."""
    results = {}
    for device in ("cpu", CUDA):
        base = load_base_model("tiny", hf_folder, torch.float32, device)
        engine = SamplingEngine(1 << 14)
        params = m.SamplingParams(max_tokens=1, temperature=1.0, seed=7, stop_at_eos=False)
        req = m.SampleRequest("s", list(range(3, 20)), 1, params, False, topk_sample_logprobs=5)
        engine.add("r", req, weights_of(base, None))
        done: list[m.Done] = []
        while engine.has_work():
            engine.step(done.append)
        results[device] = done[0].result.sequences[0]
    cpu, gpu = results["cpu"], results[CUDA]
    np.testing.assert_allclose(gpu.topk.logprobs, cpu.topk.logprobs, atol=1e-4)
    assert gpu.topk.token_ids.tolist() == cpu.topk.token_ids.tolist()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_cuda_device_this_torch_cannot_use_is_refused_clearly():
    from lathe.engine.build import check_device

    check_device("cpu")
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        check_device("cuda:0")
