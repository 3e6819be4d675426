"""KV memory of one base model: its block pool, what running requests reserved, and the
cache of finished prefills that later requests with the same prompt reuse."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from lathe.sampling.budget import blocks_for, pool_blocks
from lathe.sampling.kv_cache import KVPool, SequenceKV


@dataclass
class CachedPrefill:
    kv: SequenceKV  # shares the prompt's blocks
    last_logits: torch.Tensor  # (V,) logits after the whole prompt


class ModelMemory:
    """The KV pool of one base model, what running requests reserved in it, and the cache of
    finished prefills kept in it."""

    def __init__(self, model: nn.Module, budget_tokens: int, cache_entries: int) -> None:
        cfg = model.config
        param = next(model.parameters())
        self.pool = KVPool(
            len(model.model.layers),
            pool_blocks(budget_tokens),
            cfg.num_key_value_heads,
            cfg.head_dim,
            param.dtype,
            param.device,
        )
        self.reserved = 0  # blocks running requests may still need
        self.cache: OrderedDict[tuple, CachedPrefill] = OrderedDict()
        self.cached = 0  # blocks counted for the cache
        self.cache_entries = cache_entries

    @property
    def capacity(self) -> int:
        return len(self.pool.refs)

    def fits(self, need: int) -> bool:
        return self.reserved + self.cached + need <= self.capacity

    def remember(self, key: tuple, kv: SequenceKV, last_logits: torch.Tensor) -> None:
        size = blocks_for(kv.length)
        if key in self.cache or not self.fits(size):
            return
        self.cache[key] = CachedPrefill(kv.fork(), last_logits)
        self.cached += size
        while len(self.cache) > self.cache_entries:
            self.evict_oldest()

    def evict_oldest(self) -> None:
        _, entry = self.cache.popitem(last=False)
        self.cached -= blocks_for(entry.kv.length)
        entry.kv.free()
