"""Batch-invariant attention: a sequence gets the same numbers whatever shares its batch.

The fused CPU attention kernel's results for one sequence shift in the last bits with the
batch size and the sequence's place in it. Written out as batched matmuls and a softmax,
attention is computed the same way for every batch element, so a tenant's results do not
depend on who else is in the batch (the sampler always; training with --deterministic).
"""

from __future__ import annotations

import torch


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Attention written out: q (b, H, n, D), k/v (b, H_kv, S, D), additive bias (b, n, S)
    (0 where a key may be seen, -inf where not).

    Plain batched matmuls and a softmax give every sequence the same numbers whatever batch
    it is in and wherever it sits (the fused CPU kernel's do not, in the last bits). Query
    heads are grouped onto their key/value head instead of copying keys and values.
    """
    b, h, n, d = q.shape
    h_kv = k.shape[1]
    g = h // h_kv
    qg = (q * d**-0.5).reshape(b, h_kv, g * n, d)  # g query heads per key/value head
    scores = (qg @ k.transpose(-1, -2)).view(b, h_kv, g, n, -1)  # (b, H_kv, g, n, S)
    scores = scores.float() + bias[:, None, None]  # softmax in fp32 whatever q's dtype
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = probs.view(b, h_kv, g * n, -1) @ v  # (b, H_kv, g*n, D)
    return out.reshape(b, h, n, d)
