"""LoRA gradients and AdamW steps of the runner equal an independent reference.

The reference is the Hugging Face model with a `peft` LoRA adapter holding the same A/B
values; the loss is Tinker's weighted sum computed with plain autograd.
"""

import numpy as np
import pytest
import torch

from lathe.engine.runner import Runner, load_base_model
from lathe.protocol import messages as m
from lathe.protocol.messages import LoraConfig

from reference import RANK, assert_rel_close, make_reference, make_runner


def random_batch(seed):
    rng = np.random.default_rng(seed)
    data = []
    for n in (7, 12, 3):
        tokens = rng.integers(0, 128, n).tolist()
        data.append(
            m.Datum(
                tokens,
                {
                    "target_tokens": rng.integers(0, 128, n).astype(np.int64),
                    # negative, fractional and zero weights
                    "weights": rng.choice([-1.5, -0.25, 0.0, 0.5, 1.0, 2.0], n).astype(np.float32),
                },
            )
        )
    return data


def reference_loss(model, data):
    total = 0.0
    for d in data:
        logits = model(torch.tensor([d.tokens])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        picked = logp.gather(-1, torch.from_numpy(d.loss_inputs["target_tokens"])[:, None])[:, 0]
        total = total + (-picked * torch.from_numpy(d.loss_inputs["weights"])).sum()
    return total


def test_gradients_match_peft_reference(hf_folder):
    runner, adapter = make_runner(hf_folder)
    ref, ref_params = make_reference(hf_folder, adapter)
    data = random_batch(0)
    done = runner.run_one(
        m.Work(
            "r1",
            m.ForwardBackwardRequest("s:train:0", 1, data, "cross_entropy", {}, forward_only=False),
        )
    )
    assert done.error is None
    loss = reference_loss(ref, data)
    loss.backward()
    assert done.result.metrics["loss:sum"] == pytest.approx(loss.item(), rel=1e-5)
    for (name, kind), p in ref_params.items():
        got = getattr(adapter, "a" if kind == "lora_A" else "b")[name].grad
        assert p.grad.abs().max() > 0, name
        assert_rel_close(got, p.grad)


def test_gradients_accumulate_and_forward_leaves_them(hf_folder):
    runner, adapter = make_runner(hf_folder)
    d1, d2 = random_batch(1), random_batch(2)

    def fb(seq, data, forward_only):
        req = m.ForwardBackwardRequest("s:train:0", seq, data, "cross_entropy", {}, forward_only)
        return runner.run_one(m.Work(f"r{seq}", req))

    fb(1, d1, False)
    after_one = {k: v.grad.clone() for k, v in adapter.a.items()}
    fb(2, d2, True)  # forward only: gradients unchanged
    for k, v in adapter.a.items():
        assert torch.equal(v.grad, after_one[k])
    fb(3, d2, False)
    ref, ref_params = make_reference(hf_folder, adapter)
    (reference_loss(ref, d1) + reference_loss(ref, d2)).backward()
    for (name, kind), p in ref_params.items():
        got = (adapter.a if kind == "lora_A" else adapter.b)[name].grad
        assert_rel_close(got, p.grad)


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_optim_step_equals_torch_adamw(hf_folder, clip):
    """Given the same gradients, each step equals torch.optim.AdamW + clip_grad_norm_."""
    runner, adapter = make_runner(hf_folder)
    names = [(name, kind) for name, kind, _ in adapter.named_tensors()]
    ref = [t.detach().clone().requires_grad_(True) for _, _, t in adapter.named_tensors()]
    hp = m.AdamParams(
        learning_rate=1e-2, beta1=0.8, beta2=0.9, eps=1e-8, weight_decay=0.1, grad_clip_norm=clip
    )
    opt = torch.optim.AdamW(
        ref,
        lr=hp.learning_rate,
        betas=(hp.beta1, hp.beta2),
        eps=hp.eps,
        weight_decay=hp.weight_decay,
    )
    for step in range(1, 4):
        runner.run_one(
            m.Work(
                f"f{step}",
                m.ForwardBackwardRequest(
                    "s:train:0",
                    2 * step - 1,
                    random_batch(10 + step),
                    "cross_entropy",
                    {},
                    forward_only=False,
                ),
            )
        )
        for r, (_, _, t) in zip(ref, adapter.named_tensors(), strict=True):
            r.grad = t.grad.clone()
        done = runner.run_one(m.Work(f"o{step}", m.OptimStepRequest("s:train:0", 2 * step, hp)))
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(ref, clip)
        else:
            norm = torch.nn.utils.get_total_norm([r.grad for r in ref])
        opt.step()
        opt.zero_grad()
        assert done.result.metrics["grad_norm"] == float(norm)
        for r, (name, kind) in zip(ref, names, strict=True):
            got = (adapter.a if kind == "lora_A" else adapter.b)[name]
            assert torch.equal(got, r), (step, name, kind)
            assert got.grad is None  # the step clears the accumulated gradients


def test_bfloat16_base_keeps_fp32_adapter_and_close_logprobs(hf_folder):
    data = random_batch(3)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        runner = Runner({"tiny": load_base_model("tiny", hf_folder, dtype, "cpu")})
        req = m.CreateModelRequest("s:train:0", "tiny", LoraConfig(rank=RANK), seed=0)
        runner.run_one(m.Work("c", req))
        done = runner.run_one(
            m.Work(
                "f",
                m.ForwardBackwardRequest(
                    "s:train:0", 1, data, "cross_entropy", {}, forward_only=False
                ),
            )
        )
        adapter = runner.models["s:train:0"].adapter
        assert all(
            t.dtype == torch.float32 and t.grad.dtype == torch.float32
            for _, _, t in adapter.named_tensors()
        )
        results[dtype] = np.concatenate([o["logprobs"] for o in done.result.outputs])
    np.testing.assert_allclose(results[torch.bfloat16], results[torch.float32], atol=0.1)
