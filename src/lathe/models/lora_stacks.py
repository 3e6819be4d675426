"""Several adapters' A and B for one module, stacked for a batched matmul, and the cache
that keeps frozen adapters' stacks across forward passes (the sampler's decode steps reuse
the same adapters for many steps; stacking them again each step would copy them all)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lathe.models.lora import Adapter

FROZEN_STACK_SETS = 4  # adapter sets whose frozen stacks are kept (LRU)


def stack(
    adapters: tuple[Adapter, ...], name: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (G, r, in) and B^T (G, r, out) of `adapters` for module `name`, in `dtype`.

    B is stacked transposed: with K = rank that small, the batched matmul reads a (r, out)
    row-major operand at twice the speed of a transposed (out, r) one, and gives the same
    bits as `F.linear(h, b)`. A keeps its (r, in) layout, read transposed: that is what
    gives `F.linear(x, a)`'s bits (a contiguous (in, r) copy would not).
    """
    a = torch.stack([ad.a[name] for ad in adapters]).to(dtype)
    bt = torch.stack([ad.b[name].t() for ad in adapters]).to(dtype)
    return a, bt


@dataclass
class StackedSet:
    """The cached stacks of one set of frozen adapters, by module."""

    adapters: tuple[Adapter, ...]  # held, so that their id()s cannot be reused while cached
    # (module name, dtype) -> (A, B^T, the tensors' version counters when stacked)
    modules: dict[tuple[str, torch.dtype], tuple[torch.Tensor, torch.Tensor, list[int]]]


class FrozenStacks:
    """Stacked frozen adapters, reused across forward passes (the sampler's decode steps).

    Keyed by the adapters' identities; an entry keeps the adapters themselves and is used
    only for those very objects (`is`), and only while their tensors are unchanged (version
    counters), so neither a reused id() nor an in-place edit can serve stale weights. At most
    `max_sets` adapter sets are kept, least recently used dropped first.
    """

    def __init__(self, max_sets: int = FROZEN_STACK_SETS) -> None:
        self.max_sets = max_sets
        self.hits = 0
        self.misses = 0
        self._sets: OrderedDict[tuple[int, ...], StackedSet] = OrderedDict()
        self._lock = threading.Lock()  # the sampler and training may run on other threads

    def entry(self, adapters: tuple[Adapter, ...]) -> StackedSet:
        """The cache entry of this adapter set (made if new), now the most recently used."""
        key = tuple(id(ad) for ad in adapters)
        with self._lock:
            entry = self._sets.get(key)
            if entry is None or any(
                x is not y for x, y in zip(entry.adapters, adapters, strict=True)
            ):
                entry = self._sets[key] = StackedSet(adapters, {})
                while len(self._sets) > self.max_sets:
                    self._sets.popitem(last=False)
            self._sets.move_to_end(key)
            return entry

    def get(
        self, entry: StackedSet, name: str, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacks of `entry`'s adapters for module `name`, made again if they changed."""
        versions = [t._version for ad in entry.adapters for t in (ad.a[name], ad.b[name])]
        got = entry.modules.get((name, dtype))
        if got is not None and got[2] == versions:
            self.hits += 1
            return got[0], got[1]
        self.misses += 1
        a, bt = stack(entry.adapters, name, dtype)
        entry.modules[(name, dtype)] = (a, bt, versions)  # one dict store: atomic under the GIL
        return a, bt

    def clear(self) -> None:
        with self._lock:
            self._sets.clear()


frozen_stacks = FrozenStacks()
