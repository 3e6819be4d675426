"""Checks on training and sampling inputs that the engine relies on.

Each returns an error message for the client (naming the offending key), or None when the
input is fine. The engine can then assume well-formed batches.
"""

from __future__ import annotations

import math

import numpy as np

from lathe.protocol import messages as m
from lathe.protocol.loss_graph import LossGraph
from lathe.protocol.loss_specs import LOSS_SPECS
from lathe.store.catalog import BaseModelInfo

CUSTOM = "custom"


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


def check_config(loss_fn: str, config: dict[str, float | str]) -> str | None:
    spec = LOSS_SPECS[loss_fn]
    for key, value in config.items():
        if key not in spec.config:
            allowed = ", ".join(spec.config) or "none"
            return f"loss_fn_config key {key!r} is not used by {loss_fn} (it takes: {allowed})"
        if isinstance(value, str) or not math.isfinite(value):
            return f"loss_fn_config {key!r} must be a finite number, got {value!r}"
    merged = {**spec.config, **config}
    lo, hi = merged.get("clip_low_threshold"), merged.get("clip_high_threshold")
    if lo is not None and hi is not None and not 0 <= float(lo) <= float(hi):
        return (
            f"loss_fn_config needs 0 <= clip_low_threshold <= clip_high_threshold, got {lo}, {hi}"
        )
    if float(merged.get("beta", 0.0)) < 0:
        return "loss_fn_config 'beta' must be >= 0"
    return None


def check_batch(
    data: list[m.Datum],
    loss_fn: str,
    config: dict[str, float | str],
    info: BaseModelInfo,
    custom: LossGraph | None = None,
) -> str | None:
    if not data:
        return "the batch has no datums"
    if loss_fn == CUSTOM:
        required, allowed, two_d = set(), None, True
    elif loss_fn in LOSS_SPECS:
        if err := check_config(loss_fn, config):
            return err
        spec = LOSS_SPECS[loss_fn]
        required, allowed, two_d = (
            set(spec.required),
            {*spec.required, *spec.optional},
            spec.two_d_targets,
        )
    elif loss_fn == "stable_reinforce":  # its definition is not public: nothing to match
        return (
            "loss_fn 'stable_reinforce' is not served by this server; use importance_sampling, "
            "ppo, cispo or dro (the cookbook's RL recipes take loss_fn=importance_sampling)"
        )
    else:
        return f"unknown loss_fn {loss_fn!r}; supported: {', '.join([*LOSS_SPECS, CUSTOM])}"
    for i, d in enumerate(data):
        if err := check_datum(i, d, loss_fn, required, allowed, two_d, info):
            return err
        if custom is not None and (err := check_custom_inputs(i, d, custom)):
            return err
    # An optional input sent for some datums must be sent for all (its default is per batch).
    present = [set(d.loss_inputs) for d in data]
    if len({frozenset(p) for p in present}) > 1:
        return "every datum of a batch must send the same loss_fn_inputs keys"
    if len({d.loss_inputs["target_tokens"].ndim for d in data}) > 1:
        return "target_tokens must be (N,) for every datum or (N, K) for every datum"
    return None


def check_datum(
    i: int,
    d: m.Datum,
    loss_fn: str,
    required: set[str],
    allowed: set[str] | None,
    two_d: bool,
    info: BaseModelInfo,
) -> str | None:
    if err := check_tokens(d.tokens, info, f"datum {i} model_input"):
        return err
    n = len(d.tokens)
    targets = d.loss_inputs.get("target_tokens")
    if targets is None:
        return f"datum {i}: loss_fn_inputs needs 'target_tokens'"
    missing = required - set(d.loss_inputs)
    if missing:
        return f"datum {i}: {loss_fn} needs loss_fn_inputs {sorted(missing)}"
    if allowed is not None:
        unknown = set(d.loss_inputs) - allowed - {"target_tokens"}
        if unknown:
            return f"datum {i}: loss_fn_inputs {sorted(unknown)} are not used by {loss_fn}"
    if targets.dtype.kind not in "iu":
        return f"datum {i}: target_tokens must be integers, got {targets.dtype}"
    if targets.ndim not in ((1, 2) if two_d else (1,)) or targets.shape[0] != n:
        want = f"({n},) or ({n}, K)" if two_d else f"({n},)"
        return f"datum {i}: target_tokens has shape {targets.shape}; {loss_fn} needs {want}"
    if targets.ndim == 2 and targets.shape[1] == 0:
        return f"datum {i}: target_tokens has no targets per position"
    if allowed is not None:  # built-in losses: every float input is shaped like the targets
        for name, arr in d.loss_inputs.items():
            if arr.shape != targets.shape:
                return (
                    f"datum {i}: {name} has shape {arr.shape}; it must match target_tokens "
                    f"{targets.shape}"
                )
    for name, arr in d.loss_inputs.items():
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            return f"datum {i}: {name} contains NaN or infinity"
    if err := check_tokens(targets.reshape(-1).tolist(), info, f"datum {i} target_tokens"):
        return err
    return None


def check_custom_inputs(i: int, d: m.Datum, graph: LossGraph) -> str | None:
    n = len(d.tokens)
    lp_rank = d.loss_inputs["target_tokens"].ndim
    if lp_rank != graph.input_ranks[0]:
        return (
            f"datum {i}: loss {graph.name!r} takes logprobs of rank {graph.input_ranks[0]}, "
            f"but target_tokens has rank {lp_rank}"
        )
    for name, rank in zip(graph.input_names[1:], graph.input_ranks[1:], strict=True):
        arr = d.loss_inputs.get(name)
        if arr is None:
            return f"datum {i}: loss {graph.name!r} reads loss_fn_inputs[{name!r}], not sent"
        ok = arr.size == 1 if rank == 0 else (arr.ndim == rank and arr.shape[0] == n)
        if not ok:
            return (
                f"datum {i}: loss_fn_inputs[{name!r}] has shape {arr.shape}; loss "
                f"{graph.name!r} declared rank {rank} over {n} tokens"
            )
    return None
