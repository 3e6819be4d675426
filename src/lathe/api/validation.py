"""Checks on training and sampling inputs that the engine relies on.

Each returns an error message for the client, or None when the input is fine.
"""

from __future__ import annotations

import numpy as np

from lathe.engine import messages as m
from lathe.engine.losses import LOSS_INPUTS
from lathe.models.catalog import BaseModelInfo


def check_tokens(tokens: list[int], info: BaseModelInfo, what: str) -> str | None:
    if not tokens:
        return f"{what} is empty"
    if len(tokens) > info.max_context:
        return f"{what} has {len(tokens)} tokens; {info.name} accepts at most {info.max_context}"
    lo, hi = min(tokens), max(tokens)
    if lo < 0 or hi >= info.vocab_size:
        bad = lo if lo < 0 else hi
        return f"{what} has token id {bad} outside the vocabulary [0, {info.vocab_size})"
    return None


def check_batch(data: list[m.Datum], loss_fn: str, info: BaseModelInfo) -> str | None:
    if loss_fn not in LOSS_INPUTS:
        return f"unknown loss_fn {loss_fn!r}; supported: {', '.join(LOSS_INPUTS)}"
    if not data:
        return "the batch has no datums"
    allowed = {"target_tokens", *LOSS_INPUTS[loss_fn]}
    for i, d in enumerate(data):
        if err := check_tokens(d.tokens, info, f"datum {i} model_input"):
            return err
        n = len(d.tokens)
        unknown = set(d.loss_inputs) - allowed
        if unknown:
            return (
                f"datum {i}: loss_fn_inputs {sorted(unknown)} are not used by {loss_fn} "
                f"(it takes {sorted(allowed)})"
            )
        targets = d.loss_inputs.get("target_tokens")
        if targets is None:
            return f"datum {i}: loss_fn_inputs needs 'target_tokens'"
        if targets.dtype.kind not in "iu":
            return f"datum {i}: target_tokens must be integers, got {targets.dtype}"
        for name, arr in d.loss_inputs.items():
            if arr.shape != (n,):
                return (
                    f"datum {i}: {name} has shape {arr.shape}; it must have one entry per "
                    f"model_input token ({n},)"
                )
            if name != "target_tokens" and not np.all(np.isfinite(arr)):
                return f"datum {i}: {name} contains NaN or infinity"
        if err := check_tokens(targets.tolist(), info, f"datum {i} target_tokens"):
            return err
    return None
