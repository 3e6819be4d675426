"""KV-cache accounting in blocks: what the scheduler reserves and the KV pool hands out.

Plain arithmetic (no torch), so the scheduler can decide admission without the sampler.
"""

from __future__ import annotations

from lathe.protocol import messages as m

BLOCK = 64  # KV positions per block


def blocks_for(n: int) -> int:
    """Blocks that hold n positions."""
    return -(-n // BLOCK)


def pool_blocks(kv_cache_tokens: int) -> int:
    """Blocks of one base model's KV pool for a budget of that many positions."""
    return max(1, kv_cache_tokens // BLOCK)


def blocks_needed(req: m.SampleRequest) -> int:
    """Blocks a request may hold: its prompt once, and per sample the positions it decodes
    (including a copy of the prompt's partly filled last block)."""
    prompt = len(req.prompt)
    per_sample = blocks_for(prompt % BLOCK + req.params.max_tokens)
    return blocks_for(prompt) + req.num_samples * per_sample
