"""KV memory of one base model: its block pool, what running requests reserved, and the
cache of finished prefills that later requests with the same prompt reuse."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from lathe.protocol import messages as m
from lathe.sampling.kv_cache import BLOCK, KVPool, SequenceKV, blocks_for


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
            max(1, budget_tokens // BLOCK),
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


def blocks_needed(req: m.SampleRequest) -> int:
    """Blocks a request may hold: its prompt once, and per sample the positions it decodes
    (including a copy of the prompt's partly filled last block)."""
    prompt = len(req.prompt)
    per_sample = blocks_for(prompt % BLOCK + req.params.max_tokens)
    return blocks_for(prompt) + req.num_samples * per_sample
