"""Key/value cache for autoregressive decoding.

Scope: every row of a batch holds the same number of cached tokens (one prompt, several samples
of it). The model files only call `update`; the sampler creates, expands and discards caches.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys and values of the tokens processed so far."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # each (B, H_kv, S, D)
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        """Number of cached positions (S)."""
        k = self.keys[0]
        return 0 if k is None else k.shape[2]

    def layer_length(self, layer: int) -> int:
        """Cached positions of one layer (layers fill in turn during a forward pass)."""
        k = self.keys[layer]
        return 0 if k is None else k.shape[2]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's (B, H_kv, T, D) keys/values; return everything cached so far."""
        old_k, old_v = self.keys[layer], self.values[layer]
        if old_k is not None and old_v is not None:
            k = torch.cat([old_k, k], dim=2)
            v = torch.cat([old_v, v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def repeat_rows(self, n: int) -> KVCache:
        """A cache whose batch is each row repeated n times (prefill once, sample n times)."""
        out = KVCache(len(self.keys))
        out.keys = [None if k is None else k.repeat_interleave(n, dim=0) for k in self.keys]
        out.values = [None if v is None else v.repeat_interleave(n, dim=0) for v in self.values]
        return out
