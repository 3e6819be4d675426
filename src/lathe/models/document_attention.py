"""Causal attention over a packed stream of documents: each attends only within itself.

Training packs a micro-batch's datums end to end into one row (engine/batching.py), so the
matmuls see only real tokens. Attention must then keep the datums apart: a token sees the
earlier tokens of its own datum and nothing else. Datums of the same length attend together
in one batched call (an equal-length batch is one call, with no copies); the work is what
the datums' own causal attention costs, never that of the whole stream.

With `invariant`, attention is written out as batched matmuls (models/invariant.py), so a
datum's numbers are bitwise the same whatever else is packed with it. Otherwise PyTorch's
fused `scaled_dot_product_attention` runs, except for short documents on a CPU: there the
written-out matmuls are faster (forward and backward of 8 x 128 tokens: 7 ms against 13 ms
per layer on 2 cores) and their (n, n) scores are small; from MATMUL_MAX_LENGTH on, the fused
kernel is as fast and its memory stays linear in the length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lathe.models.invariant import grouped_attention

MATMUL_MAX_LENGTH = 256  # CPU: documents up to this long attend with written-out matmuls


class DocumentAttention:
    """The `attention` a model forward gets for a stream of documents of `lengths` tokens."""

    def __init__(self, lengths: list[int], invariant: bool, device: torch.device) -> None:
        self.invariant = invariant
        starts: dict[int, list[int]] = {}  # length -> where each document of it starts
        at = 0
        for n in lengths:
            starts.setdefault(n, []).append(at)
            at += n
        self.tokens = at
        # (length, documents, their token rows in the stream) per distinct length
        self.groups = [
            (n, len(s), (torch.tensor(s)[:, None] + torch.arange(n)).flatten().to(device))
            for n, s in starts.items()
        ]
        self.masks: dict[int, torch.Tensor] = {}  # length -> causal bias (written-out matmuls)

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        # q (1, H, N, D), k/v (1, H_kv, N, D) -> (1, H, N, D), token-major underneath (so the
        # caller's transpose back to (1, N, H * D) is free)
        h, d = q.shape[1], q.shape[3]
        if len(self.groups) == 1:  # all documents of one length: a plain batch, no copies
            n, b, _ = self.groups[0]
            y = self.attend(*(t[0].unflatten(1, (b, n)).transpose(0, 1) for t in (q, k, v)))
            return y.transpose(1, 2).reshape(self.tokens, h, d).transpose(0, 1)[None]
        # Token-major (N, H, D): each group picks its rows; every row belongs to one group.
        qt, kt, vt = (t[0].transpose(0, 1) for t in (q, k, v))
        out = qt.new_empty(qt.shape)
        for n, b, rows in self.groups:
            # (b * n, H, D) -> (b, H, n, D)
            qs, ks, vs = (t.index_select(0, rows).view(b, n, *t.shape[1:]) for t in (qt, kt, vt))
            y = self.attend(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2))
            out.index_copy_(0, rows, y.transpose(1, 2).reshape(b * n, h, d))
        return out.transpose(0, 1)[None]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of a batch of equal-length documents: q (b, H, n, D)."""
        b, n = q.shape[0], q.shape[2]
        written_out = self.invariant or (q.device.type == "cpu" and n <= MATMUL_MAX_LENGTH)
        if not written_out:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        if n not in self.masks:  # in q's dtype: a float32 bias would promote bf16 scores
            future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
            zeros = torch.zeros(n, n, dtype=q.dtype, device=q.device)
            self.masks[n] = zeros.masked_fill(future, float("-inf"))
        return grouped_attention(q, k, v, self.masks[n][None].expand(b, n, n))
