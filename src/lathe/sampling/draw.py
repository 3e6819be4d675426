"""Drawing the next token of every sample of a step at once.

All rows of a step go through one batched computation: tempered, filtered log-probabilities
(sampling/logits.py, per group of rows with the same top-k/top-p), the inverse-CDF draw,
the sampled token's log-probability and the top-k rows, and come back to the host in one
transfer. Nothing here waits on the device per row.

Randomness is counter-based: the uniform number of a sample's t-th token is a hash
(SplitMix64) of the sample's stream and t, computed on the host. A sample's tokens therefore
depend on its seed and its own history only, never on which other rows share the step.

Batch invariance of the arithmetic: the logits are copied into rows padded to a multiple of
ROW_ALIGN values, so vectorised kernels split every row at the same columns whatever the
number of rows; reductions and scans run along each row on its own.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np
import torch

from lathe.models.transfer import fetch, to_device
from lathe.protocol.messages import SamplingParams
from lathe.sampling.logits import next_token_distribution
from lathe.sampling.outputs import topk_cells

ROW_ALIGN = 64  # values; rows start 256-byte aligned in fp32


@dataclass(frozen=True)
class DrawRow:
    """One sample's next token to draw: how, and from which random stream."""

    params: SamplingParams
    stream: int  # the sample's random stream (see `sample_streams`)
    counter: int  # tokens the sample has drawn so far
    topk: int = 0  # top-k log-probabilities wanted alongside (0: none)


@dataclass(frozen=True)
class Drawn:
    token: int
    logprob: float
    topk: tuple[np.ndarray, np.ndarray] | None


def sample_streams(seed: int | None, n: int) -> list[int]:
    """One random stream per sample, from the request seed and the sample's index alone."""
    base = secrets.randbits(63) if seed is None else seed % (2**63)
    return [(base * 1_000_003 + i) % (2**63) for i in range(n)]


def uniforms(streams: list[int], counters: list[int]) -> np.ndarray:
    """U[0, 1) per row: SplitMix64 of (stream, counter), 53 random bits each."""
    with np.errstate(over="ignore"):
        z = np.array(streams, dtype=np.uint64) + (
            np.array(counters, dtype=np.uint64) + np.uint64(1)
        ) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def aligned_copy(logits: list[torch.Tensor]) -> torch.Tensor:
    """R logits rows (V,) copied into fp32 rows padded to ROW_ALIGN values (at -inf)."""
    v = logits[0].shape[0]
    width = -(-v // ROW_ALIGN) * ROW_ALIGN
    buf = torch.full((len(logits), width), -math.inf, dtype=torch.float32, device=logits[0].device)
    buf[:, :v] = torch.stack(logits)
    return buf


def distributions(logits: list[torch.Tensor], rows: list[DrawRow]) -> torch.Tensor:
    """R logits rows -> (R, W) log-probs of the distributions sampled, W >= V at -inf."""
    buf = aligned_copy(logits)
    groups: dict[tuple[float, int, float], list[int]] = {}
    for i, row in enumerate(rows):
        p = row.params
        groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
    if len(groups) == 1:
        return next_token_distribution(buf, rows[0].params)
    out = torch.empty_like(buf)
    for idx in groups.values():
        at = to_device(idx, torch.long, buf.device)
        out[at] = next_token_distribution(buf[at], rows[idx[0]].params)
    return out


def draw_all(logits: list[torch.Tensor], rows: list[DrawRow]) -> list[Drawn]:
    """The next token of every row (from its logits (V,)), its log-probability and top-k
    rows, with one transfer to the host."""
    if not rows:
        return []
    device = logits[0].device
    logp = distributions(logits, rows)  # (R, W)
    vocab = logits[0].shape[0]
    u = to_device(
        uniforms([r.stream for r in rows], [r.counter for r in rows]), torch.float64, device
    )
    cdf = torch.cumsum(logp.exp().double(), dim=-1)  # (R, W); padding adds exact zeros
    tokens = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    # u * total rounded up to the total: take the last token that can be drawn
    last_allowed = vocab - 1 - (logp[:, :vocab].flip(-1) > -math.inf).int().argmax(-1)
    tokens = torch.where(tokens >= vocab, last_allowed, tokens)
    greedy = [r.params.temperature == 0 for r in rows]
    if any(greedy):  # decided from the rows on the host: no device round trip
        tokens = torch.where(to_device(greedy, torch.bool, device), logp.argmax(-1), tokens)
    chosen = logp.gather(-1, tokens[:, None])[:, 0]
    k = max(r.topk for r in rows)
    parts = [tokens, chosen]
    if k:
        top = torch.topk(logp[:, :vocab], min(k, vocab), dim=-1)
        parts += [top.indices, top.values]
    host = fetch(parts)  # the step's one transfer
    toks, lps = host[0].astype(np.int64), host[1]
    if k:
        top_ids, top_lps = host[2], host[3]
    out = []
    for i, row in enumerate(rows):
        topk = None
        if row.topk:
            topk = topk_cells(top_ids[i], top_lps[i], row.topk)
        out.append(Drawn(int(toks[i]), float(np.float32(lps[i])), topk))
    return out
