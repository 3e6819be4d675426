"""KV caches of sampled sequences, and the attention that reads and extends them.

Each sequence owns its keys and values per layer, in buffers that grow in steps of BUCKET
positions. A sampler step packs the new tokens of many sequences (a prefill chunk for some,
one decoded token for others) into one row; `PackedAttention` then appends each sequence's
new keys and values to its own cache and attends each sequence to its own past only.

Batch invariance: a sequence's attention is computed over its cache padded to its own length
rounded up to BUCKET, batched only with sequences of the same padded length and the same
number of new tokens, with plain matmuls (`grouped_attention`), so its numbers do not depend
on which other sequences share the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

BUCKET = 64  # cache capacity and attention length grow in steps of this many positions


def bucketed(n: int) -> int:
    return max(BUCKET, -(-n // BUCKET) * BUCKET)


@dataclass
class SequenceKV:
    """Keys and values of one sequence: per layer (H_kv, capacity, D)."""

    num_layers: int
    length: int = 0  # positions filled
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.keys, *self.values])

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store (H_kv, n, D) new keys/values at positions length..length+n (length advances
        once all layers have written, see `advance`)."""
        n = k.shape[1]
        need = self.length + n
        if layer == len(self.keys):  # first write of this layer
            cap = bucketed(need)
            self.keys.append(k.new_zeros(k.shape[0], cap, k.shape[2]))
            self.values.append(v.new_zeros(v.shape[0], cap, v.shape[2]))
        elif need > self.keys[layer].shape[1]:
            cap = bucketed(need)
            self.keys[layer] = grow(self.keys[layer], cap)
            self.values[layer] = grow(self.values[layer], cap)
        self.keys[layer][:, self.length : need] = k
        self.values[layer][:, self.length : need] = v

    def advance(self, n: int) -> None:
        self.length += n

    def fork(self) -> SequenceKV:
        """A copy sharing nothing: a further sample of the same prompt."""
        return SequenceKV(
            self.num_layers,
            self.length,
            [k.clone() for k in self.keys],
            [v.clone() for v in self.values],
        )


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Masked attention written out: q (b, H, n, D), k/v (b, H_kv, S, D), mask (b, n, S).

    Plain batched matmuls and a softmax give every sequence the same numbers whatever batch
    it is in and wherever it sits (the fused CPU kernel's do not, in the last bits). Query
    heads are grouped onto their key/value head instead of copying keys and values.
    """
    b, h, n, d = q.shape
    h_kv = k.shape[1]
    g = h // h_kv
    qg = q.reshape(b, h_kv, g * n, d)  # heads h_kv*g .. of one group are contiguous
    scores = (qg @ k.transpose(-1, -2)) * d**-0.5  # (b, H_kv, g*n, S)
    keep = mask[:, None].repeat(1, 1, g, 1)  # (b, 1, g*n, S)
    scores = scores.masked_fill(~keep, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v  # (b, H_kv, g*n, D)
    return out.reshape(b, h, n, d)


def grow(t: torch.Tensor, capacity: int) -> torch.Tensor:
    out = t.new_zeros(t.shape[0], capacity, t.shape[2])
    out[:, : t.shape[1]] = t
    return out


@dataclass(frozen=True)
class Segment:
    """Tokens [start, start + n) of the packed row belong to `kv`, after its `kv.length`."""

    kv: SequenceKV
    start: int
    n: int


class PackedAttention:
    """The `attention` a model forward gets for a packed row of many sequences."""

    def __init__(self, segments: list[Segment]) -> None:
        self.segments = segments
        groups: dict[tuple[int, int], list[Segment]] = {}
        for seg in segments:
            key = (bucketed(seg.kv.length + seg.n), seg.n)
            groups.setdefault(key, []).append(seg)
        self.groups = groups

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        # q (1, H, N, D), k/v (1, H_kv, N, D): N tokens of several sequences side by side.
        for seg in self.segments:
            sl = slice(seg.start, seg.start + seg.n)
            seg.kv.append(layer, k[0, :, sl], v[0, :, sl])
        out = torch.empty_like(q)
        for (span, n), segs in self.groups.items():
            qs = torch.stack([q[0, :, s.start : s.start + n] for s in segs])  # (b, H, n, D)
            ks = torch.stack([s.kv.keys[layer][:, :span] for s in segs])  # (b, H_kv, S, D)
            vs = torch.stack([s.kv.values[layer][:, :span] for s in segs])
            past = torch.tensor([s.kv.length for s in segs], device=q.device)
            # new token i of a sequence sits at past + i and sees keys 0 .. past + i
            pos = past[:, None] + torch.arange(n, device=q.device)  # (b, n)
            mask = torch.arange(span, device=q.device) <= pos[..., None]  # (b, n, S)
            y = grouped_attention(qs, ks, vs, mask)
            for i, s in enumerate(segs):
                out[0, :, s.start : s.start + n] = y[i]
        return out
