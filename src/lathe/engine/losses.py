"""The built-in losses of the Tinker contract, as weighted sums over tokens.

Every loss sees the learner's log-probabilities `logp` of the target tokens and the datum's
inputs, all shaped (B, T), plus a 0/1 `mask` of real (not padding) positions, and returns
the per-token loss; the total loss is its plain sum (never a mean). Per-token outputs go
back to the client, so chunked batches recombine exactly.

    cross_entropy        -sum(logp * weights)                           weights default 1
    importance_sampling  -sum(exp(logp - q) * A)                        q = sampler logprobs
    ppo                  -sum(min(r * A, clip(r, lo, hi) * A))          r = exp(logp - q)
    cispo                -sum(sg(clip(r, lo, hi)) * logp * A)           sg = stop-gradient
    dro                  -sum(logp * A - beta/2 * (logp - q)^2)
    gspo                 ppo on the sequence ratio s = exp(mean_seq(logp - q)), taken token by
                         token as sg(s) * exp(logp - sg(logp)) so each token keeps its own
                         gradient; the mean runs over `sequence_ratio_mask` (default: every
                         token with a non-zero advantage)

Defaults: ppo clips to [0.8, 1.2]; cispo to [0, 4] (one-sided, as the CISPO papers
recommend); gspo to [1 - 3e-4, 1 + 4e-4] (the GSPO paper's range, as the sequence ratio
stays close to 1); dro beta 0.1. Clip thresholds may come from loss_fn_config or as per-token
inputs (per-token inputs win).

Ratio losses also report `ratio:mean` and `clip_fraction:mean`: per datum, over its tokens
with a non-zero advantage, then averaged over datums, which the client's chunk merge (a
datum-weighted mean) keeps exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class LossBatch:
    """What a loss sees: everything (B, T), padding positions masked out."""

    logp: Tensor  # learner log-probabilities of the target tokens
    inputs: dict[str, Tensor]  # float loss_fn_inputs by name, defaults filled in
    mask: Tensor  # 1.0 on real tokens, 0.0 on padding
    config: dict[str, float]  # loss_fn_config, defaults filled in


@dataclass(frozen=True)
class LossResult:
    elementwise: Tensor  # (B, T) per-token loss, zero on padding
    metrics: dict[str, Tensor] = field(default_factory=dict)  # "name:reduction" -> scalar


def cross_entropy(b: LossBatch) -> LossResult:
    return LossResult(-b.logp * b.inputs["weights"] * b.mask)


def importance_sampling(b: LossBatch) -> LossResult:
    ratio = torch.exp(b.logp - b.inputs["logprobs"])
    adv = b.inputs["advantages"]
    return LossResult(-ratio * adv * b.mask, ratio_metrics(b, ratio, None))


def ppo(b: LossBatch) -> LossResult:
    ratio = torch.exp(b.logp - b.inputs["logprobs"])
    return clipped_surrogate(b, ratio)


def cispo(b: LossBatch) -> LossResult:
    ratio = torch.exp(b.logp - b.inputs["logprobs"])
    lo, hi = thresholds(b)
    coef = torch.clamp(ratio, lo, hi).detach()
    clipped = (ratio < lo) | (ratio > hi)
    elementwise = -coef * b.logp * b.inputs["advantages"] * b.mask
    return LossResult(elementwise, ratio_metrics(b, ratio, clipped))


def dro(b: LossBatch) -> LossResult:
    beta = b.config["beta"]
    q, adv = b.inputs["logprobs"], b.inputs["advantages"]
    objective = b.logp * adv - 0.5 * beta * (b.logp - q) ** 2
    return LossResult(-objective * b.mask)


def gspo(b: LossBatch) -> LossResult:
    seq_mask = b.inputs.get("sequence_ratio_mask")
    if seq_mask is None:
        seq_mask = (b.inputs["advantages"] != 0).float()
    seq_mask = seq_mask * b.mask
    count = seq_mask.sum(dim=1, keepdim=True).clamp(min=1.0)  # (B, 1)
    log_ratio = b.logp - b.inputs["logprobs"]
    seq_ratio = torch.exp((log_ratio * seq_mask).sum(dim=1, keepdim=True) / count)  # (B, 1)
    # Same value as the sequence ratio at every token, but the gradient of each token's own
    # log-probability (GSPO-token).
    ratio = seq_ratio.detach() * torch.exp(b.logp - b.logp.detach())
    return clipped_surrogate(b, ratio)


def clipped_surrogate(b: LossBatch, ratio: Tensor) -> LossResult:
    lo, hi = thresholds(b)
    adv = b.inputs["advantages"]
    unclipped, clipped_obj = ratio * adv, torch.clamp(ratio, lo, hi) * adv
    objective = torch.minimum(unclipped, clipped_obj)
    clipped = clipped_obj < unclipped  # the clip is the active branch
    return LossResult(-objective * b.mask, ratio_metrics(b, ratio, clipped))


def thresholds(b: LossBatch) -> tuple[Tensor, Tensor]:
    lo = b.inputs.get("clip_low_threshold")
    hi = b.inputs.get("clip_high_threshold")
    lo = lo if lo is not None else torch.full_like(b.logp, b.config["clip_low_threshold"])
    hi = hi if hi is not None else torch.full_like(b.logp, b.config["clip_high_threshold"])
    return lo, hi


def ratio_metrics(b: LossBatch, ratio: Tensor, clipped: Tensor | None) -> dict[str, Tensor]:
    """Datum means over the tokens that carry an advantage, then the mean over datums."""
    active = (b.inputs["advantages"] != 0).float() * b.mask
    count = active.sum(dim=1).clamp(min=1.0)  # (B,)
    metrics = {"ratio:mean": ((ratio.detach() * active).sum(dim=1) / count).mean()}
    if clipped is not None:
        metrics["clip_fraction:mean"] = ((clipped.float() * active).sum(dim=1) / count).mean()
    return metrics


# The formula of each loss; what it accepts is protocol/loss_specs.py.
LOSSES: dict[str, Callable[[LossBatch], LossResult]] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
    "gspo": gspo,
}
