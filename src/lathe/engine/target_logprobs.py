"""log p(target) of every real position of a micro-batch, without its whole logits.

The losses only need the log-probabilities of the targets, (B, T, K). The logits behind them
are (B, T, V): with a real vocabulary (Qwen3's 151,936 tokens) 8 x 4,096 positions of fp32
logits are 20 GB before their gradient. So the unembedding runs over the packed (only real)
positions in chunks of at most LOGITS_CHUNK_BYTES of logits; each chunk keeps only its
(rows, K) log-probabilities, and when the micro-batch's logits would not fit in one chunk,
the backward pass recomputes a chunk's logits from its hidden states when it reaches it
(`torch.utils.checkpoint`), so at most one chunk of logits exists at any time. Small
batches (most of them with a small vocabulary) run as one chunk, with nothing recomputed.

Chunks never span two requests and start at each request's first position, so a request's
numbers do not depend on what shares its micro-batch (bitwise with --deterministic).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lathe.models.lora import Adapter, RowGroup, use_adapters, whole_batch
from lathe.models.transfer import to_device

LOGITS_CHUNK_BYTES = 128 * 2**20  # fp32 logits of one chunk; its backward holds ~3x this


def target_logprobs(
    lm_head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    lengths: list[int],
    spans: list[tuple[int, int, Adapter]],
    row_invariant: bool,
) -> torch.Tensor:
    """hidden (N, H) of datums packed end to end, targets (B, T, K) of the same datums
    right-padded -> log p(target) (B, T, K) in fp32, 0 on padding.

    Datum `r` has `lengths[r]` positions; `spans` gives each request's datums [r0, r1) and
    the adapter its logits use.
    """
    B, T, K = targets.shape
    vocab = lm_head.weight.shape[0]
    chunk = max(1, LOGITS_CHUNK_BYTES // (vocab * 4))
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    real = np.concatenate([np.arange(n) + r * T for r, n in enumerate(lengths)])
    positions = to_device(real, torch.long, hidden.device)  # each packed position in (B * T)
    recompute = torch.is_grad_enabled() and len(positions) > chunk
    h, t = hidden, targets.reshape(B * T, K).index_select(0, positions)
    groups = [RowGroup(starts[r0], starts[r1], adapter) for r0, r1, adapter in spans]
    if len(positions) <= chunk and not row_invariant:  # the usual small batch: one pass
        return scatter(chunk_logprobs(lm_head, groups, False, h, t), positions, B, T)
    pieces = []
    for r0, r1, adapter in spans:
        for c in range(starts[r0], starts[r1], chunk):
            end = min(c + chunk, starts[r1])
            one = partial(chunk_logprobs, lm_head, whole_batch(adapter), row_invariant)
            hc, tc = h[c:end], t[c:end]
            pieces.append(
                checkpoint(one, hc, tc, use_reentrant=False) if recompute else one(hc, tc)
            )
    return scatter(torch.cat(pieces), positions, B, T)


def scatter(logp: torch.Tensor, positions: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """(n, K) rows of the real positions -> (B, T, K), zeros on padding."""
    out = logp.new_zeros(B * T, logp.shape[-1])
    return out.index_copy(0, positions, logp).view(B, T, -1)


def chunk_logprobs(
    lm_head: nn.Module,
    groups: list[RowGroup],
    row_invariant: bool,
    h: torch.Tensor,
    t: torch.Tensor,
) -> torch.Tensor:
    """(n, H) hidden states and (n, K) targets -> (n, K) log p(target); `groups` say which
    rows use which adapter."""
    with use_adapters(groups, row_invariant):
        logits = lm_head(h).float()  # (n, V): the only place logits exist, one chunk at a time
    # log_softmax's fused kernels (forward and backward) beat logsumexp and a subtraction
    return torch.log_softmax(logits, dim=-1).gather(-1, t)
