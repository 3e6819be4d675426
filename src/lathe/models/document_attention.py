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

    def __init__(self, lengths: list[int], invariant: bool) -> None:
        self.lengths = lengths
        self.invariant = invariant
        self.by_length: dict[int, list[int]] = {}  # length -> indices of its documents
        for i, n in enumerate(lengths):
            self.by_length.setdefault(n, []).append(i)
        self.masks: dict[int, torch.Tensor] = {}  # length -> causal bias (written-out matmuls)

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        # q (1, H, N, D), k/v (1, H_kv, N, D) -> (1, H, N, D), token-major underneath (so the
        # caller's transpose back to (1, N, H * D) is free)
        h, d = q.shape[1], q.shape[3]
        tokens = q.shape[2]
        if len(self.by_length) == 1:  # all documents of one length: a plain batch, no copies
            b, n = len(self.lengths), self.lengths[0]
            y = self.attend(*(t[0].unflatten(1, (b, n)).transpose(0, 1) for t in (q, k, v)))
            return y.transpose(1, 2).reshape(tokens, h, d).transpose(0, 1)[None]
        # Token-major (N, H, D), split into the documents (views). Documents of one length are
        # stacked into a batch; the outputs are joined in stream order with one cat. Each
        # step's backward is one op too (cat / unbind / split), so the cost stays linear in
        # the stream, however many lengths it holds.
        docs = [t[0].transpose(0, 1).split(self.lengths) for t in (q, k, v)]  # (n, H, D) each
        out: list[torch.Tensor] = [q] * len(self.lengths)  # every entry is replaced below
        for members in self.by_length.values():
            y = self.attend(*(stacked(part, members) for part in docs))  # (b, H, n, D)
            for j, i in enumerate(members):
                out[i] = y[j].transpose(0, 1)  # (n, H, D)
        return torch.cat(out).transpose(0, 1)[None]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of a batch of equal-length documents: q (b, H, n, D)."""
        b, n = q.shape[0], q.shape[2]
        written_out = self.invariant or (q.device.type == "cpu" and n <= MATMUL_MAX_LENGTH)
        if not written_out:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        if n not in self.masks:  # fp32: the scores are taken to fp32 for the softmax
            future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
            zeros = torch.zeros(n, n, device=q.device)
            self.masks[n] = zeros.masked_fill(future, float("-inf"))
        return grouped_attention(q, k, v, self.masks[n][None].expand(b, n, n))


def stacked(docs: tuple[torch.Tensor, ...], members: list[int]) -> torch.Tensor:
    """Documents `members` of (n, H, D) each as one batch (b, H, n, D); one is just a view."""
    if len(members) == 1:
        return docs[members[0]][None].transpose(1, 2)
    return torch.stack([docs[i] for i in members]).transpose(1, 2)
