"""Paged KV cache of sampled sequences, and the attention that reads and extends it.

Keys and values live in one pool per layer, cut into blocks of BLOCK positions; a sequence
owns a list of blocks (its block table). The pool is head-major: entry h * num_blocks + block
holds kv head h of a block, values as (BLOCK, D) and keys transposed, (D, BLOCK), which is the
layout decoding reads them in without copying (sampling/paged_attention.py). Samples of one
prompt share the prompt's blocks (copy-on-write for a partly filled last block), so a
prompt's keys and values exist once however many samples are drawn from it. The pool's size
is the sampler's memory budget.

A sampler step packs the new tokens of many sequences (a prefill chunk for some, one decoded
token for others) into one row. `PackedAttention` writes all their keys and values into the
pool with one indexed copy per layer, then attends each sequence to its own blocks only.

Batch invariance: a sequence's attention is computed over its own blocks, batched only with
sequences of the same block count and the same number of new tokens, so its numbers do not
depend on which other sequences share the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lathe.models.transfer import to_device
from lathe.sampling.budget import BLOCK, blocks_for
from lathe.sampling.paged_attention import chunk_attention, decode_attention


class KVPool:
    """Blocks of keys and values for every layer, head-major: keys (H_kv * num_blocks, D,
    BLOCK), transposed, and values (H_kv * num_blocks, BLOCK, D)."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_blocks, self.kv_heads = num_blocks, kv_heads
        self.head_dim = head_dim
        entries = kv_heads * num_blocks
        # torch.empty: pages are only touched (and resident) once blocks are used.
        self.keys = [
            torch.empty((entries, head_dim, BLOCK), dtype=dtype, device=device)
            for _ in range(num_layers)
        ]
        self.values = [
            torch.empty((entries, BLOCK, head_dim), dtype=dtype, device=device)
            for _ in range(num_layers)
        ]
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
            self.by_head(k)[:, block].zero_()
            self.by_head(v)[:, block].zero_()
        return block

    def by_head(self, pool: torch.Tensor) -> torch.Tensor:
        """A layer's keys or values as (H_kv, num_blocks, D, BLOCK) or (.., BLOCK, D)."""
        return pool.view(self.kv_heads, self.num_blocks, *pool.shape[1:])

    def entries(self, tables: torch.Tensor) -> torch.Tensor:
        """Pool entries of block tables (b, nblocks), head-major: (H_kv * b * nblocks,)."""
        heads = torch.arange(self.kv_heads, device=tables.device)[:, None] * self.num_blocks
        return (heads + tables.flatten()).flatten()

    def decode_rows(self, tables: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value rows that `decode_attention` reads for block tables (b, nblocks),
        with `heads` query heads: (b * heads * nblocks, D) rows of D-by-BLOCK key blocks and
        (b * heads, nblocks * BLOCK) rows of BLOCK-by-D value blocks."""
        b, nblocks = tables.shape
        device = tables.device
        kv_head = torch.arange(heads, device=device) // (heads // self.kv_heads)
        entry = kv_head[None, :, None] * self.num_blocks + tables[:, None, :]  # (b, H, nb)
        keys = entry[..., None] * self.head_dim + torch.arange(self.head_dim, device=device)
        values = entry[..., None] * BLOCK + torch.arange(BLOCK, device=device)
        return keys.view(-1, self.head_dim), values.view(b * heads, nblocks * BLOCK)

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
            self.by_head(k)[:, dst] = self.by_head(k)[:, src]
            self.by_head(v)[:, dst] = self.by_head(v)[:, src]
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
        self.write_blocks = to_device(blocks, torch.long, device)
        self.write_offsets = to_device(offsets, torch.long, device)
        by_shape: dict[tuple[int, int], list[Segment]] = {}
        for seg in segments:
            by_shape.setdefault((blocks_for(seg.kv.length + seg.n), seg.n), []).append(seg)
        self.groups = []
        for (nblocks, n), segs in by_shape.items():
            rows = to_device([s.start + i for s in segs for i in range(n)], torch.long, device)
            tables = to_device([s.kv.blocks[:nblocks] for s in segs], torch.long, device)
            past = to_device([s.kv.length for s in segs], torch.long, device)
            pos = past[:, None] + torch.arange(n, device=device)  # (b, n)
            # new token i of a sequence sits at past + i and sees keys 0 .. past + i
            seen = torch.arange(nblocks * BLOCK, device=device) <= pos[..., None]  # (b, n, S)
            bias = torch.zeros(seen.shape, device=device).masked_fill(~seen, float("-inf"))
            self.groups.append((len(segs), n, rows, tables, bias))
        self.reads: list | None = None  # per group, what it reads: made at the first layer

    def group_reads(self, heads: int) -> list:
        """Per group, the pool rows its attention reads (the same in every layer)."""
        if self.reads is None:
            self.reads = [
                self.pool.decode_rows(tables, heads) if n == 1 else self.pool.entries(tables)
                for _, n, _, tables, _ in self.groups
            ]
        return self.reads

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        # q (1, H, N, D), k/v (1, H_kv, N, D): N tokens of several sequences side by side.
        kp, vp = self.pool.keys[layer], self.pool.values[layer]
        blocks, offsets = self.write_blocks, self.write_offsets
        w = len(blocks)  # the segments' tokens; any after them are padding
        self.pool.by_head(kp)[:, blocks, :, offsets] = k[0, :, :w].transpose(0, 1)  # (w, H_kv, D)
        self.pool.by_head(vp)[:, blocks, offsets] = v[0, :, :w]  # (H_kv, w, D)
        h, d = q.shape[1], q.shape[3]
        h_kv = k.shape[1]
        g = h // h_kv
        # Token-major (N, H, D), made contiguous once: each group then picks its tokens' rows
        # without copying all of q again (index_select copies a strided input whole first).
        qt = q[0].transpose(0, 1).contiguous()
        out = torch.zeros_like(qt)  # (N, H, D); rows no group covers (padding) stay zero
        groups = zip(self.groups, self.group_reads(h), strict=True)
        for (b, n, rows, _, bias), reads in groups:
            qs = qt.index_select(0, rows)  # (b * n, H, D)
            if n == 1:
                key_rows, value_rows = reads
                keys_t, values = kp.view(-1, BLOCK), vp.view(-1, d)
                y = decode_attention(qs, keys_t, values, key_rows, value_rows, bias)
                out.index_copy_(0, rows, y)
                continue
            # (b * n, H, D) -> (H_kv, b, g * n, D): a sequence's g query heads of a kv head
            qs = qs.view(b, n, h_kv, g, d).permute(2, 0, 3, 1, 4).reshape(h_kv, b, g * n, d)
            ks = kp.index_select(0, reads).view(h_kv, b, -1, d, BLOCK)
            ks = ks.transpose(-1, -2).reshape(h_kv, b, -1, d)  # (H_kv, b, S, D)
            vs = vp.index_select(0, reads).view(h_kv, b, -1, d)
            y = chunk_attention(qs, ks, vs, bias)  # (H_kv, b, g * n, D)
            y = y.view(h_kv, b, g, n, d).permute(1, 3, 0, 2, 4).reshape(b * n, h, d)
            out.index_copy_(0, rows, y)
        return out.transpose(0, 1)[None]  # (1, H, N, D), token-major underneath
