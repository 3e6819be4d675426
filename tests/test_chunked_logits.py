"""The loss path computes log p(target) from hidden states in chunks of rows, never the whole
(B, T, V) logits, and its numbers are those of the one-pass computation.

The chunk size is shrunk here so that the tiny model's micro-batches split into many chunks
(with the backward recomputing each chunk's logits), as a real vocabulary's would.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lathe.engine import target_logprobs as tl
from lathe.protocol import messages as m

from reference import assert_rel_close, make_reference, make_runner
from test_multi_tenant import batch_for, fb, grads, runner_with
from test_training_numerics import random_batch, reference_loss

CHUNK_ROWS = 5  # positions per chunk in these tests


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of CHUNK_ROWS positions for a vocabulary of `vocab`; records each unembedding's
    row count."""
    calls: list[int] = []

    def shrink(vocab: int) -> list[int]:
        monkeypatch.setattr(tl, "LOGITS_CHUNK_BYTES", CHUNK_ROWS * vocab * 4)
        original = tl.chunk_logprobs

        def counted(lm_head, groups, row_invariant, h, t):
            calls.append(h.shape[0])
            return original(lm_head, groups, row_invariant, h, t)

        monkeypatch.setattr(tl, "chunk_logprobs", counted)
        return calls

    return shrink


def run_fb(runner, data, forward_only=False):
    req = m.ForwardBackwardRequest("s:train:0", 1, data, "cross_entropy", {}, forward_only)
    done = runner.run_one(m.Work("f", req))
    assert done.error is None
    return done.result


def test_chunked_gradients_match_the_reference_and_one_pass(hf_folder, small_chunks):
    data = random_batch(0)  # 22 positions in three rows
    runner, adapter = make_runner(hf_folder)
    whole = run_fb(runner, data)
    whole_grads = {k: t.grad.clone() for k, t in adapter.a.items()}

    runner, adapter = make_runner(hf_folder)
    calls = small_chunks(128)
    chunked = run_fb(runner, data)
    # every unembedding ran on at most one chunk of rows, and the chunks cover the batch
    assert calls and max(calls) <= CHUNK_ROWS
    assert sum(calls) >= sum(len(d.tokens) for d in data)

    assert chunked.metrics["loss:sum"] == pytest.approx(whole.metrics["loss:sum"], rel=1e-6)
    for a, b in zip(chunked.outputs, whole.outputs, strict=True):
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], rtol=1e-6, atol=1e-6)
    for name, g in whole_grads.items():
        assert_rel_close(adapter.a[name].grad, g, tol=1e-6)

    ref, ref_params = make_reference(hf_folder, adapter)
    loss = reference_loss(ref, data)
    loss.backward()
    assert chunked.metrics["loss:sum"] == pytest.approx(loss.item(), rel=1e-5)
    for (name, kind), p in ref_params.items():
        got = (adapter.a if kind == "lora_A" else adapter.b)[name].grad
        assert_rel_close(got, p.grad)


def test_forward_only_chunks_without_gradients(hf_folder, small_chunks):
    data = random_batch(1)
    runner, adapter = make_runner(hf_folder)
    whole = run_fb(runner, data, forward_only=True)
    runner, adapter = make_runner(hf_folder)
    calls = small_chunks(128)
    chunked = run_fb(runner, data, forward_only=True)
    assert max(calls) <= CHUNK_ROWS
    assert all(t.grad is None for t in adapter.parameters())
    for a, b in zip(chunked.outputs, whole.outputs, strict=True):
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], rtol=1e-6, atol=1e-6)


def test_chunked_co_batch_is_bitwise_alone_in_deterministic_mode(tiny_qwen3, small_chunks):
    runner = runner_with(tiny_qwen3, 2, deterministic=True)
    vocab = runner.models["m0"].adapter.b["lm_head"].shape[0]
    small_chunks(vocab)
    data = [batch_for(i, lengths) for i, lengths in enumerate([(7, 13), (12, 5, 9)])]
    alone, outputs = {}, {}
    for i in range(2):
        done = runner.run_one(fb(f"m{i}", 1, data[i]))
        alone[i], outputs[i] = grads(runner, f"m{i}"), done.result
    for tm in runner.models.resident():
        tm.optimizer.zero_grad()
    together = runner.execute_co_batch([fb(f"m{i}", 2, data[i]) for i in range(2)])
    for i, done in enumerate(together):
        assert done.error is None
        assert done.result.metrics["loss:sum"] == outputs[i].metrics["loss:sum"]
        for key, g in alone[i].items():
            assert torch.equal(grads(runner, f"m{i}")[key], g), key
        for a, b in zip(done.result.outputs, outputs[i].outputs, strict=True):
            assert np.array_equal(a["logprobs"], b["logprobs"])
