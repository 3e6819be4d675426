"""What each built-in loss accepts: inputs and config keys (the formulas are engine/losses.py).

The API checks requests against these before they reach the engine; the engine fills in the
defaults. Kept apart from the formulas so that checking a request needs no torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LossSpec:
    """The inputs and config one loss accepts."""

    required: tuple[str, ...]  # float inputs every datum must send (besides target_tokens)
    optional: dict[str, float | None]  # input -> value when absent (None: stays absent)
    config: dict[str, float]  # loss_fn_config key -> default
    two_d_targets: bool = False  # accepts target_tokens of shape (N, K)


RL = ("logprobs", "advantages")
CLIPS: dict[str, float | None] = {"clip_low_threshold": None, "clip_high_threshold": None}

LOSS_SPECS: dict[str, LossSpec] = {
    "cross_entropy": LossSpec((), {"weights": 1.0}, {}, two_d_targets=True),
    "importance_sampling": LossSpec(RL, {}, {}),
    "ppo": LossSpec(RL, CLIPS, {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
    "cispo": LossSpec(RL, CLIPS, {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}),
    "dro": LossSpec(RL, {}, {"beta": 0.1}),
    "gspo": LossSpec(
        RL,
        {**CLIPS, "sequence_ratio_mask": None},
        {"clip_low_threshold": 1 - 3e-4, "clip_high_threshold": 1 + 4e-4},
    ),
}
