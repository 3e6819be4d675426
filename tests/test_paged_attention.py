"""Attention over the paged KV pool: the decode path reads the pool in place and agrees with
the matmul path; a sequence's numbers do not depend on what shares its batch."""

import torch

from lathe.sampling.budget import BLOCK
from lathe.sampling.kv_cache import KVPool
from lathe.sampling.paged_attention import chunk_attention, decode_attention

HEADS, KV_HEADS, DIM, NBLOCKS = 8, 4, 16, 3


def filled_pool() -> KVPool:
    pool = KVPool(1, 16, KV_HEADS, DIM, torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    pool.keys[0].copy_(torch.randn(pool.keys[0].shape, generator=gen))
    pool.values[0].copy_(torch.randn(pool.values[0].shape, generator=gen))
    return pool


def decode(pool: KVPool, q: torch.Tensor, tables: torch.Tensor, lengths: list[int]):
    keys, values = pool.decode_rows(tables, HEADS)
    seen = torch.arange(NBLOCKS * BLOCK) < torch.tensor(lengths)[:, None]
    bias = torch.zeros(seen.shape).masked_fill(~seen, float("-inf"))[:, None]  # (b, 1, S)
    keys_t, vals = pool.keys[0].view(-1, BLOCK), pool.values[0].view(-1, DIM)
    return decode_attention(q, keys_t, vals, keys, values, bias), bias


def test_decode_reads_pool_in_place_and_matches_matmuls():
    pool = filled_pool()
    tables = torch.tensor([[3, 7, 1], [0, 12, 5]])
    q = torch.randn(2, HEADS, DIM, generator=torch.Generator().manual_seed(1))
    got, bias = decode(pool, q, tables, [150, 129])
    # reference: copy each sequence's blocks out, contiguous, and attend with matmuls
    entries = pool.entries(tables)
    k = pool.keys[0].index_select(0, entries).view(KV_HEADS, 2, NBLOCKS, DIM, BLOCK)
    k = k.transpose(-1, -2).reshape(KV_HEADS, 2, -1, DIM)
    v = pool.values[0].index_select(0, entries).view(KV_HEADS, 2, -1, DIM)
    qh = q.view(2, KV_HEADS, HEADS // KV_HEADS, DIM).transpose(0, 1)  # (H_kv, b, g, D)
    want = chunk_attention(qh, k, v, bias).transpose(0, 1).reshape(2, HEADS, DIM)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_decode_is_batch_invariant():
    pool = filled_pool()
    q = torch.randn(5, HEADS, DIM, generator=torch.Generator().manual_seed(2))
    tables = torch.tensor([[3, 7, 1], [0, 12, 5], [2, 4, 6], [8, 9, 10], [11, 13, 14]])
    lengths = [150, 129, 140, 192, 131]
    together, _ = decode(pool, q, tables, lengths)
    for i in range(5):
        alone, _ = decode(pool, q[i : i + 1], tables[i : i + 1], lengths[i : i + 1])
        assert torch.equal(alone[0], together[i])
