"""Training packs a micro-batch's datums end to end: no padding for the model, attention kept
within each datum, and a datum's numbers independent of what it is packed with."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lathe.engine.batching import co_batches, packs, stream
from lathe.models.document_attention import DocumentAttention
from lathe.protocol import messages as m

from test_multi_tenant import batch_for, fb, runner_with


def datums(lengths) -> list[m.Datum]:
    return batch_for(0, lengths)


def test_a_request_of_mixed_lengths_is_one_micro_batch_within_the_budget():
    assert packs(datums([7, 300, 33, 120]), 512) == [[0, 1, 2, 3]]
    assert packs(datums([7, 300, 33, 120]), 400) == [[0, 1, 2], [3]]
    assert packs(datums([900, 5]), 512) == [[0], [1]]  # a datum over the budget: on its own


def test_requests_of_different_lengths_share_a_micro_batch():
    batches = co_batches([datums([7, 20]), datums([64]), datums([300])], 512)
    assert [[(p.job, p.rows, p.tokens) for p in b] for b in batches] == [
        [(0, [0, 1], 27), (1, [0], 64), (2, [0], 300)]
    ]
    # each request is cut as if alone; only whole parts merge, within the budget
    batches = co_batches([datums([200, 200, 200]), datums([100])], 450)
    assert [[(p.job, p.rows) for p in b] for b in batches] == [[(0, [0, 1])], [(0, [2]), (1, [0])]]


def test_stream_puts_datums_end_to_end_with_their_own_positions():
    s = stream(datums([3, 2]), torch.device("cpu"))
    assert s.positions.tolist() == [[0, 1, 2, 0, 1]]
    assert s.ids[0].tolist() == datums([3, 2])[0].tokens + datums([3, 2])[1].tokens
    assert s.lengths == [3, 2]


@pytest.mark.parametrize("invariant", [False, True])
@pytest.mark.parametrize("lengths", [[5, 9, 5, 3], [6, 6, 6]])
def test_document_attention_is_each_documents_own_causal_attention(lengths, invariant):
    gen = torch.Generator().manual_seed(0)
    n = sum(lengths)
    q = torch.randn(1, 4, n, 8, generator=gen, requires_grad=True)
    k = torch.randn(1, 2, n, 8, generator=gen, requires_grad=True)
    v = torch.randn(1, 2, n, 8, generator=gen, requires_grad=True)
    got = DocumentAttention(lengths, invariant)(0, q, k, v)
    pieces, at = [], 0
    for length in lengths:
        s = slice(at, at + length)
        pieces.append(
            F.scaled_dot_product_attention(
                q[:, :, s], k[:, :, s], v[:, :, s], is_causal=True, enable_gqa=True
            )
        )
        at += length
    want = torch.cat(pieces, dim=2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    grad = torch.randn(want.shape, generator=gen)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_datums_numbers_do_not_depend_on_what_it_is_packed_with(tiny_qwen3):
    """--deterministic: a datum's logprobs are bitwise the same alone and packed between
    others (at another offset of the stream, beside other lengths)."""
    runner = runner_with(tiny_qwen3, 1, deterministic=True)
    neighbours = batch_for(5, (13, 40, 3))
    target = batch_for(6, (21,))[0]
    alone = runner.run_one(fb("m0", 1, [target])).result.outputs[0]["logprobs"]
    together = runner.run_one(fb("m0", 2, [neighbours[0], target, *neighbours[1:]]))
    assert np.array_equal(together.result.outputs[1]["logprobs"], alone)
