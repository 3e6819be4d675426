"""Every built-in loss against a plain-PyTorch reference of its formula.

The reference model is transformers + peft holding the same adapter values; each loss is
written here again, term by term, per datum, without padding. Loss value, per-token outputs,
metrics and LoRA gradients must agree within 1e-5 (relative).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lathe.engine.forward_backward import Batching
from lathe.protocol import messages as m

from reference import assert_rel_close, grads_of, make_reference, make_runner, reference_logprobs

LENGTHS = (9, 14, 5, 11)


def rl_batch(seed: int, ref_model) -> list[m.Datum]:
    """Sampler logprobs near the learner's, so ratios land inside and outside the clip range."""
    rng = np.random.default_rng(seed)
    data = []
    for n in LENGTHS:
        tokens = rng.integers(0, 128, n).tolist()
        targets = rng.integers(0, 128, n)
        with torch.no_grad():
            lp = reference_logprobs(ref_model, tokens, targets).numpy()
        adv = rng.normal(0, 1, n) * (rng.random(n) > 0.2)  # both signs, some zeros
        data.append(
            m.Datum(
                tokens,
                {
                    "target_tokens": targets.astype(np.int64),
                    "logprobs": (lp + rng.normal(0, 0.3, n)).astype(np.float32),
                    "advantages": adv.astype(np.float32),
                },
            )
        )
    return data


def reference_terms(loss_fn: str, lp, inp: dict, cfg: dict):
    """Per-token loss terms of the documented formulas (one datum, no padding)."""
    t = {k: torch.as_tensor(v) for k, v in inp.items()}
    if loss_fn == "cross_entropy":
        return -lp * t.get("weights", torch.ones_like(lp))
    q, adv = t["logprobs"], t["advantages"]
    ratio = torch.exp(lp - q)
    lo = t.get("clip_low_threshold", cfg.get("clip_low_threshold"))
    hi = t.get("clip_high_threshold", cfg.get("clip_high_threshold"))
    if loss_fn == "importance_sampling":
        return -ratio * adv
    if loss_fn == "ppo":
        return -torch.minimum(ratio * adv, torch.clamp(ratio, lo, hi) * adv)
    if loss_fn == "cispo":
        return -torch.clamp(ratio, lo, hi).detach() * lp * adv
    if loss_fn == "dro":
        return -(lp * adv - 0.5 * cfg["beta"] * (lp - q) ** 2)
    if loss_fn == "gspo":
        mask = t["sequence_ratio_mask"]
        s = torch.exp(((lp - q) * mask).sum() / mask.sum())
        r = s.detach() * torch.exp(lp - lp.detach())
        return -torch.minimum(r * adv, torch.clamp(r, lo, hi) * adv)
    raise AssertionError(loss_fn)


def reference_ratio_metrics(loss_fn, data, lps, cfg):
    ratios, clips = [], []
    for d, lp in zip(data, lps, strict=True):
        inp = d.loss_inputs
        active = inp["advantages"] != 0
        r = np.exp(lp.detach().numpy() - inp["logprobs"])
        if loss_fn == "gspo":
            mask = inp["sequence_ratio_mask"]
            r = np.full_like(r, np.exp(((np.log(r)) * mask).sum() / mask.sum()))
        ratios.append(r[active].mean())
        lo, hi = cfg.get("clip_low_threshold"), cfg.get("clip_high_threshold")
        if loss_fn in ("ppo", "gspo"):
            a = inp["advantages"]
            clipped = np.clip(r, lo, hi) * a < r * a
            clips.append(clipped[active].mean())
        elif loss_fn == "cispo":
            clips.append(((r < lo) | (r > hi))[active].mean())
    out = {"ratio:mean": float(np.mean(ratios))}
    if clips:
        out["clip_fraction:mean"] = float(np.mean(clips))
    return out


CASES = [
    ("cross_entropy", {}, {}),
    ("importance_sampling", {}, {}),
    ("ppo", {}, {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),  # defaults
    (
        "ppo",
        {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05},
        {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05},
    ),
    ("cispo", {}, {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}),  # defaults
    (
        "cispo",
        {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
        {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
    ),
    ("dro", {"beta": 0.05}, {"beta": 0.05}),
    (
        "gspo",
        {"clip_low_threshold": 0.95, "clip_high_threshold": 1.02},
        {"clip_low_threshold": 0.95, "clip_high_threshold": 1.02},
    ),
]


@pytest.mark.parametrize(("loss_fn", "config", "effective"), CASES)
def test_loss_matches_reference_formula(hf_folder, loss_fn, config, effective):
    runner, adapter = make_runner(hf_folder)
    ref, ref_params = make_reference(hf_folder, adapter)
    data = rl_batch(1, ref)
    rng = np.random.default_rng(2)
    for d in data:
        n = len(d.tokens)
        if loss_fn == "cross_entropy":
            d.loss_inputs["weights"] = rng.normal(0, 1, n).astype(np.float32)
        if loss_fn == "gspo":
            d.loss_inputs["sequence_ratio_mask"] = (rng.random(n) > 0.3).astype(np.float32)
            d.loss_inputs["sequence_ratio_mask"][0] = 1.0
    done = runner.run_one(
        m.Work(
            "f", m.ForwardBackwardRequest("s:train:0", 1, data, loss_fn, config, forward_only=False)
        )
    )
    assert done.error is None, done.error
    res = done.result

    total, lps = 0.0, []
    for d, out in zip(data, res.outputs, strict=True):
        lp = reference_logprobs(ref, d.tokens, d.loss_inputs["target_tokens"])
        terms = reference_terms(loss_fn, lp, d.loss_inputs, effective)
        np.testing.assert_allclose(out["logprobs"], lp.detach().numpy(), atol=1e-5)
        np.testing.assert_allclose(out["elementwise_loss"], terms.detach().numpy(), atol=1e-5)
        total = total + terms.sum()
        lps.append(lp)
    total.backward()
    assert res.metrics["loss:sum"] == pytest.approx(float(total), rel=1e-5, abs=1e-6)
    got = grads_of(adapter)
    for key, p in ref_params.items():
        assert_rel_close(got[key], p.grad)
    if loss_fn not in ("cross_entropy", "dro"):
        expected = reference_ratio_metrics(loss_fn, data, lps, effective)
        for key, value in expected.items():
            assert res.metrics[key] == pytest.approx(value, abs=1e-5), key
    if config and loss_fn in ("ppo", "cispo", "gspo"):  # ratios both inside and outside
        assert 0 < res.metrics["clip_fraction:mean"] < 1


def test_per_token_clip_thresholds_override_config(hf_folder):
    runner, adapter = make_runner(hf_folder)
    ref, ref_params = make_reference(hf_folder, adapter)
    data = rl_batch(3, ref)
    rng = np.random.default_rng(4)
    for d in data:
        n = len(d.tokens)
        d.loss_inputs["clip_low_threshold"] = rng.uniform(0.7, 0.95, n).astype(np.float32)
        d.loss_inputs["clip_high_threshold"] = rng.uniform(1.05, 1.3, n).astype(np.float32)
    config = {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0}  # overridden per token
    runner.run_one(
        m.Work(
            "f", m.ForwardBackwardRequest("s:train:0", 1, data, "ppo", config, forward_only=False)
        )
    )
    total = sum(
        reference_terms(
            "ppo",
            reference_logprobs(ref, d.tokens, d.loss_inputs["target_tokens"]),
            d.loss_inputs,
            config,
        ).sum()
        for d in data
    )
    total.backward()
    got = grads_of(adapter)
    for key, p in ref_params.items():
        assert_rel_close(got[key], p.grad)


def test_two_dimensional_targets_for_cross_entropy(hf_folder):
    """target_tokens (N, K) with weights (N, K): a sum over K targets per position."""
    runner, adapter = make_runner(hf_folder)
    ref, ref_params = make_reference(hf_folder, adapter)
    rng = np.random.default_rng(5)
    data = []
    for n in (6, 10):
        data.append(
            m.Datum(
                rng.integers(0, 128, n).tolist(),
                {
                    "target_tokens": rng.integers(0, 128, (n, 3)).astype(np.int64),
                    "weights": rng.dirichlet(np.ones(3), n).astype(np.float32),
                },
            )
        )
    done = runner.run_one(
        m.Work(
            "f",
            m.ForwardBackwardRequest("s:train:0", 1, data, "cross_entropy", {}, forward_only=False),
        )
    )
    total = 0.0
    for d, out in zip(data, done.result.outputs, strict=True):
        lp = reference_logprobs(ref, d.tokens, d.loss_inputs["target_tokens"])
        assert out["logprobs"].shape == d.loss_inputs["target_tokens"].shape
        np.testing.assert_allclose(out["logprobs"], lp.detach().numpy(), atol=1e-5)
        total = total + (-lp * torch.from_numpy(d.loss_inputs["weights"])).sum()
    total.backward()
    assert done.result.metrics["loss:sum"] == pytest.approx(float(total), rel=1e-5)
    got = grads_of(adapter)
    for key, p in ref_params.items():
        assert_rel_close(got[key], p.grad)


def test_micro_batches_give_the_same_result_as_one_batch(hf_folder):
    """Packing under a tiny token budget changes nothing but the work's shape."""
    results = []
    for budget in (10_000, 16):  # one micro-batch vs one datum per micro-batch
        runner, adapter = make_runner(hf_folder)
        runner.training = Batching(token_budget=budget)
        ref, _ = make_reference(hf_folder, adapter)
        done = runner.run_one(
            m.Work(
                "f",
                m.ForwardBackwardRequest(
                    "s:train:0", 1, rl_batch(6, ref), "ppo", {}, forward_only=False
                ),
            )
        )
        results.append((done.result, {k: v.clone() for k, v in grads_of(adapter).items()}))
    (r1, g1), (r2, g2) = results
    for a, b in zip(r1.outputs, r2.outputs, strict=True):
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-6)
        np.testing.assert_allclose(a["elementwise_loss"], b["elementwise_loss"], atol=1e-6)
    for key in r1.metrics:
        assert r1.metrics[key] == pytest.approx(r2.metrics[key], rel=1e-6, abs=1e-7)
    for key in g1:
        assert_rel_close(g2[key], g1[key], tol=1e-6)
