"""Many adapters on one base model: co-batching, isolation of state, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lathe.engine.runner import Runner, load_base_model
from lathe.protocol import messages as m
from lathe.protocol.messages import LoraConfig


def runner_with(tiny_qwen3, n_models: int, deterministic: bool) -> Runner:
    runner = Runner(
        {"tiny": load_base_model("tiny", tiny_qwen3, torch.float32, "cpu")},
        deterministic=deterministic,
    )
    for i in range(n_models):
        req = m.CreateModelRequest(f"m{i}", "tiny", LoraConfig(rank=4 + 2 * i), seed=i)
        assert runner.run_one(m.Work(f"c{i}", req)).error is None
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():  # non-zero B so that every tensor gets a gradient
            for b in runner.models[f"m{i}"].adapter.b.values():
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return runner


def batch_for(seed: int, lengths) -> list[m.Datum]:
    rng = np.random.default_rng(seed)
    return [
        m.Datum(
            rng.integers(0, 500, n).tolist(),
            {
                "target_tokens": rng.integers(0, 500, n).astype(np.int64),
                "weights": rng.normal(0, 1, n).astype(np.float32),
            },
        )
        for n in lengths
    ]


def fb(model: str, seq: int, data, loss_fn="cross_entropy") -> m.Work:
    return m.Work(
        f"{model}/{seq}",
        m.ForwardBackwardRequest(model, seq, data, loss_fn, {}, False, None, "tiny"),
        tenant=model,
    )


def grads(runner: Runner, model: str) -> dict:
    return {(n, k): t.grad.clone() for n, k, t in runner.models[model].adapter.named_tensors()}


def clear(runner: Runner) -> None:
    for tm in runner.models.resident():
        tm.optimizer.zero_grad()


@pytest.mark.parametrize("deterministic", [False, True])
def test_co_batched_adapters_get_the_gradients_they_get_alone(tiny_qwen3, deterministic):
    runner = runner_with(tiny_qwen3, 3, deterministic)
    data = [
        batch_for(i, lengths) for i, lengths in enumerate([(7, 20, 33), (12, 5), (40, 9, 9, 18)])
    ]
    alone, outputs = {}, {}
    for i in range(3):
        done = runner.run_one(fb(f"m{i}", 1, data[i]))
        alone[i], outputs[i] = grads(runner, f"m{i}"), done.result
    clear(runner)
    together = runner.execute_co_batch([fb(f"m{i}", 2, data[i]) for i in range(3)])
    for i, done in enumerate(together):
        assert done.error is None
        got = grads(runner, f"m{i}")
        for key, g in alone[i].items():
            if deterministic:
                assert torch.equal(got[key], g), key
            else:
                torch.testing.assert_close(got[key], g, rtol=1e-6, atol=1e-6 * g.abs().max())
        assert done.result.metrics["loss:sum"] == pytest.approx(
            outputs[i].metrics["loss:sum"], rel=0 if deterministic else 1e-6
        )
        for a, b in zip(done.result.outputs, outputs[i].outputs, strict=True):
            if deterministic:
                assert np.array_equal(a["logprobs"], b["logprobs"])
            else:
                np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-6)


def test_one_adapters_step_leaves_the_others_bitwise_unchanged(tiny_qwen3):
    runner = runner_with(tiny_qwen3, 2, False)
    for i in range(2):
        runner.run_one(fb(f"m{i}", 1, batch_for(i, (9, 14))))
        runner.run_one(m.Work(f"o{i}", m.OptimStepRequest(f"m{i}", 2, m.AdamParams(1e-2))))
        runner.run_one(fb(f"m{i}", 3, batch_for(10 + i, (6,))))  # pending gradients too
    b = runner.models["m1"]
    before = (
        {
            k: t.detach().clone()
            for k, t in zip(
                [(n, kind) for n, kind, _ in b.adapter.named_tensors()],
                b.adapter.parameters(),
                strict=True,
            )
        },
        {k: v.clone() for k, v in b.optimizer.state_tensors().items()},
        grads(runner, "m1"),
    )
    hp = m.AdamParams(learning_rate=0.5, weight_decay=0.5, grad_clip_norm=0.1)
    runner.run_one(m.Work("oa", m.OptimStepRequest("m0", 4, hp)))
    after_weights = {(n, kind): t for n, kind, t in b.adapter.named_tensors()}
    assert all(torch.equal(after_weights[k], v) for k, v in before[0].items())
    assert all(torch.equal(b.optimizer.state_tensors()[k], v) for k, v in before[1].items())
    assert all(torch.equal(grads(runner, "m1")[k], v) for k, v in before[2].items())


def test_adapters_beyond_the_memory_budget_swap_to_disk_and_continue_exactly(tiny_qwen3, tmp_path):
    def train(runner: Runner) -> list[float]:
        losses = []
        for i in range(6):
            runner.run_one(
                m.Work(f"c{i}", m.CreateModelRequest(f"m{i}", "tiny", LoraConfig(rank=4), seed=i))
            )
        seq = {i: 1 for i in range(6)}
        for _ in range(3):
            for i in range(6):  # in turn, so every adapter is evicted between its steps
                done = runner.run_one(fb(f"m{i}", seq[i], batch_for(i, (8, 13))))
                # a pending gradient survives the swap: the step comes after another adapter
                runner.run_one(fb(f"m{(i + 1) % 6}", seq[(i + 1) % 6], batch_for(i, (5,))))
                seq[(i + 1) % 6] += 1
                runner.run_one(
                    m.Work("o", m.OptimStepRequest(f"m{i}", seq[i] + 1, m.AdamParams(0.05)))
                )
                seq[i] += 2
                losses.append(done.result.metrics["loss:sum"])
        return losses

    base = load_base_model("tiny", tiny_qwen3, torch.float32, "cpu")
    unbounded = Runner({"tiny": base})
    bounded = Runner({"tiny": base}, max_resident_adapters=2, swap_dir=tmp_path / "swap")
    expected = train(unbounded)
    assert train(bounded) == expected  # bit for bit
    assert len(bounded.models.resident()) <= 2 and bounded.models.swaps_out >= 18
    assert len(list((tmp_path / "swap").iterdir())) == 4  # the other four, on disk
