"""Attention of a group of sequences over their blocks of the paged KV pool.

Two ways, chosen by the number of new tokens each sequence brings (never by its neighbours,
so a sequence's numbers depend only on itself):

- `decode_attention`, one new token per sequence: reads keys and values where they lie in
  the pool, through `embedding_bag` (a weighted sum of indexed rows, computed without first
  copying the rows out). A query's scores against a block are a weighted sum of the rows of
  the block's transposed keys (weights: the query), and its output a weighted sum of value
  rows (weights: the softmax). Decode is bound by reading the cache, so reading it once
  is what counts.
- `chunk_attention`, a prefill chunk per sequence: copies the group's blocks out once and
  runs batched matmuls, which reuse every key for all the chunk's queries.

Both are batch invariant: each sequence's numbers come from its own bags or its own matmuls,
in a fixed order, whatever else shares the step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decode_attention(
    q: torch.Tensor,
    keys_t: torch.Tensor,
    values: torch.Tensor,
    key_rows: torch.Tensor,
    value_rows: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """q (b, H, D) -> (b, H, D). keys_t: the pool's transposed keys as rows of BLOCK
    positions (one per kv head, block and dim), values: its values as rows of D; key_rows
    (b * H * nblocks, D) and value_rows (b * H, S) index them per (sequence, query head);
    bias (b, 1, S) is 0 where a key may be seen, -inf where not."""
    b, h, d = q.shape
    nblocks = key_rows.shape[0] // (b * h)
    weights = (q * d**-0.5)[:, :, None].expand(b, h, nblocks, d).reshape(-1, d)
    scores = F.embedding_bag(key_rows, keys_t, mode="sum", per_sample_weights=weights)
    # softmax in fp32 whatever the cache's dtype, as fused attention kernels do
    probs = torch.softmax(scores.view(b, h, -1).float() + bias, dim=-1).to(values.dtype)
    out = F.embedding_bag(value_rows, values, mode="sum", per_sample_weights=probs.view(b * h, -1))
    return out.view(b, h, d)


def chunk_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Attention written out, head-major: q (H_kv, b, g * n, D) with the g query heads of
    each key/value head side by side, k/v (H_kv, b, S, D), additive bias (b, n, S) (0 where a
    key may be seen, -inf where not) -> (H_kv, b, g * n, D).

    Per (kv head, sequence) the same matmuls and softmax as models/invariant.py's
    `grouped_attention`.
    """
    h_kv, b, gn, d = q.shape
    n = bias.shape[1]
    scores = ((q * d**-0.5) @ k.transpose(-1, -2)).view(h_kv, b, gn // n, n, -1)
    scores = scores.float() + bias[None, :, None]  # softmax in fp32 whatever q's dtype
    return torch.softmax(scores, dim=-1).to(v.dtype).view(h_kv, b, gn, -1) @ v
