"""Activation checkpointing per decoder layer: long micro-batches recompute each layer in the
backward pass, with the same gradients as keeping every activation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lathe.engine.forward_backward import Batching
from lathe.protocol import messages as m

from reference import assert_rel_close, make_runner
from test_training_numerics import random_batch


def run(hf_folder, how: Batching, forward_only: bool = False):
    """(result, gradients, forward runs of layer 0's MLP) of one forward_backward."""
    runner, adapter = make_runner(hf_folder)
    runner.training = how
    calls = []
    mlp = runner.base_models["tiny"].module.model.layers[0].mlp
    swiglu = mlp.swiglu

    def counted(*args):  # the recomputed forward calls it too (forward hooks are not rerun)
        calls.append(1)
        return swiglu(*args)

    mlp.swiglu = counted
    req = m.ForwardBackwardRequest(
        "s:train:0", 1, random_batch(0), "cross_entropy", {}, forward_only
    )
    done = runner.run_one(m.Work("f", req))
    assert done.error is None
    grads = {k: None if t.grad is None else t.grad.clone() for k, t in adapter.a.items()}
    return done.result, grads, len(calls)


def test_checkpointed_layers_recompute_and_give_the_same_gradients(hf_folder):
    kept, kept_grads, kept_calls = run(hf_folder, Batching(checkpoint_tokens=10_000))
    redone, redone_grads, redone_calls = run(hf_folder, Batching(checkpoint_tokens=0))
    assert kept_calls == 1  # one micro-batch, activations kept
    assert redone_calls == 2  # run again when the backward pass reaches the layer
    assert redone.metrics["loss:sum"] == pytest.approx(kept.metrics["loss:sum"], rel=1e-6)
    for a, b in zip(redone.outputs, kept.outputs, strict=True):
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], rtol=1e-6, atol=1e-6)
    for name, g in kept_grads.items():
        assert_rel_close(redone_grads[name], g, tol=1e-6)


def test_forward_only_never_recomputes(hf_folder):
    _, grads, calls = run(hf_folder, Batching(checkpoint_tokens=0), forward_only=True)
    assert calls == 1
    assert all(g is None for g in grads.values())
    assert torch.is_grad_enabled()
