"""Loss functions of the Tinker contract, as weighted sums over tokens.

Each loss takes the learner's log-probabilities of the target tokens and the datum's inputs,
and returns the per-token loss; the total is its plain sum (never a mean). Per-token outputs
go back to the client unchanged, so the client can recombine chunks exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# logprobs (B, T) and inputs name -> (B, T) -> elementwise loss (B, T)
LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


def cross_entropy(logprobs: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """loss = sum(-logp(target) * weight); weights may be any real number, default 1."""
    weights = inputs.get("weights")
    return -logprobs if weights is None else -logprobs * weights


# loss_fn name -> function. Every loss reads `target_tokens`; other inputs are per loss.
LOSSES: dict[str, LossFn] = {
    "cross_entropy": cross_entropy,
}
# loss_fn name -> the float inputs it accepts besides target_tokens (all shaped like them).
LOSS_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("weights",),
}
