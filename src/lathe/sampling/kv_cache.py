"""Paged KV cache of sampled sequences, and the attention that reads and extends it.

Keys and values live in one pool per layer, cut into blocks of BLOCK positions; a sequence
owns a list of blocks (its block table). Samples of one prompt share the prompt's blocks
(copy-on-write for a partly filled last block), so a prompt's keys and values exist once
however many samples are drawn from it. The pool's size is the sampler's memory budget.

A sampler step packs the new tokens of many sequences (a prefill chunk for some, one decoded
token for others) into one row. `PackedAttention` writes all their keys and values into the
pool with one indexed copy per layer, then attends each sequence to its own blocks only.

Batch invariance: a sequence's attention is computed over its own blocks, batched only with
sequences of the same block count and the same number of new tokens, with plain matmuls
(`grouped_attention`), so its numbers do not depend on which other sequences share the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lathe.models.invariant import grouped_attention
from lathe.sampling.budget import BLOCK, blocks_for


class KVPool:
    """Blocks of keys and values for every layer: (num_blocks, H_kv, BLOCK, D) each."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_blocks, kv_heads, BLOCK, head_dim)
        # torch.empty: pages are only touched (and resident) once blocks are used.
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.refs = [0] * num_blocks
        self.free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        block = self.free.pop()
        self.refs[block] = 1
        # Unwritten positions are masked out, but masked weights (0) times garbage values
        # (NaN in never-used memory) would still be NaN: start every block at zero.
        for k, v in zip(self.keys, self.values, strict=True):
            k[block].zero_()
            v[block].zero_()
        return block

    def share(self, block: int) -> None:
        self.refs[block] += 1

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free.append(block)

    def copy_block(self, src: int) -> int:
        dst = self.free.pop()
        self.refs[dst] = 1
        for k, v in zip(self.keys, self.values, strict=True):
            k[dst] = k[src]
            v[dst] = v[src]
        return dst


@dataclass
class SequenceKV:
    """One sequence's block table in a pool."""

    pool: KVPool
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # positions filled

    def reserve(self, n: int) -> None:
        """Make room for n more positions (own, unshared blocks for everything written)."""
        if self.blocks and self.length % BLOCK and self.pool.refs[self.blocks[-1]] > 1:
            shared = self.blocks[-1]  # a partly filled block shared with a fork: copy on write
            self.blocks[-1] = self.pool.copy_block(shared)
            self.pool.release(shared)
        while len(self.blocks) * BLOCK < self.length + n:
            self.blocks.append(self.pool.allocate())

    def slots(self, n: int) -> tuple[list[int], list[int]]:
        """(block, offset) of positions length .. length + n - 1."""
        pos = range(self.length, self.length + n)
        return [self.blocks[p // BLOCK] for p in pos], [p % BLOCK for p in pos]

    def advance(self, n: int) -> None:
        self.length += n

    def fork(self) -> SequenceKV:
        """Another sequence continuing from the same positions, sharing their blocks."""
        for b in self.blocks:
            self.pool.share(b)
        return SequenceKV(self.pool, list(self.blocks), self.length)

    def free(self) -> None:
        for b in self.blocks:
            self.pool.release(b)
        self.blocks = []


@dataclass(frozen=True)
class Segment:
    """Tokens [start, start + n) of the packed row belong to `kv`, after its `kv.length`."""

    kv: SequenceKV
    start: int
    n: int


def gather(pool: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """The blocks of each table, contiguous: (b, nblocks) -> (b, H_kv, nblocks * BLOCK, D)."""
    b, nblocks = tables.shape
    h_kv, d = pool.shape[1], pool.shape[3]
    blocks = pool.index_select(0, tables.flatten()).view(b, nblocks, h_kv, BLOCK, d)
    return blocks.transpose(1, 2).reshape(b, h_kv, nblocks * BLOCK, d)


class PackedAttention:
    """The `attention` a model forward gets for a packed row of many sequences.

    Everything that does not depend on the layer (where each token's keys go, which blocks
    each group reads, the masks) is worked out once per step here.
    """

    def __init__(self, pool: KVPool, segments: list[Segment], device: torch.device) -> None:
        self.pool = pool
        blocks, offsets = [], []
        for seg in segments:
            seg.kv.reserve(seg.n)
            b, o = seg.kv.slots(seg.n)
            blocks += b
            offsets += o
        self.write_blocks = torch.tensor(blocks, device=device)
        self.write_offsets = torch.tensor(offsets, device=device)
        by_shape: dict[tuple[int, int], list[Segment]] = {}
        for seg in segments:
            by_shape.setdefault((blocks_for(seg.kv.length + seg.n), seg.n), []).append(seg)
        self.groups = []
        for (nblocks, n), segs in by_shape.items():
            rows = torch.tensor([s.start + i for s in segs for i in range(n)], device=device)
            tables = torch.tensor([s.kv.blocks[:nblocks] for s in segs], device=device)
            past = torch.tensor([s.kv.length for s in segs], device=device)
            pos = past[:, None] + torch.arange(n, device=device)  # (b, n)
            # new token i of a sequence sits at past + i and sees keys 0 .. past + i
            seen = torch.arange(nblocks * BLOCK, device=device) <= pos[..., None]  # (b, n, S)
            bias = torch.zeros(seen.shape, device=device).masked_fill(~seen, float("-inf"))
            self.groups.append((len(segs), n, rows, tables, bias))

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        # q (1, H, N, D), k/v (1, H_kv, N, D): N tokens of several sequences side by side.
        kp, vp = self.pool.keys[layer], self.pool.values[layer]
        kp[self.write_blocks, :, self.write_offsets] = k[0].transpose(0, 1)  # (N, H_kv, D)
        vp[self.write_blocks, :, self.write_offsets] = v[0].transpose(0, 1)
        out = torch.empty_like(q[0])  # (H, N, D)
        for b, n, rows, tables, bias in self.groups:
            h, d = q.shape[1], q.shape[3]
            qs = q[0].index_select(1, rows).reshape(h, b, n, d).transpose(0, 1)  # (b, H, n, D)
            ks, vs = gather(kp, tables), gather(vp, tables)  # (b, H_kv, S, D)
            y = grouped_attention(qs.contiguous(), ks, vs, bias)  # (b, H, n, D)
            out.index_copy_(1, rows, y.transpose(0, 1).reshape(h, b * n, d))
        return out[None]
