"""Sampling parameters of an inference request, checked against the model and the limits
that `/asample` has too (`max_sample_tokens`, `max_num_samples`)."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException

from lathe.api.deps import Caller
from lathe.api.inference.model_ref import Target
from lathe.protocol import messages as m


def nulls_dropped(data: Any) -> Any:
    """A request field sent as null means "not set" (some clients send every field): it takes
    its default. A `mode="before"` validator of the request models."""
    return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


def sampling_params(
    caller: Caller,
    target: Target,
    prompt_len: int,
    *,
    max_tokens: int | None,
    temperature: float,
    top_p: float,
    top_k: int = -1,
    seed: int | None = None,
    stop: str | list[str] | None = None,
    n: int = 1,
) -> m.SamplingParams:
    limits = caller.state.settings.limits
    context = target.info.max_context
    if prompt_len == 0:
        raise HTTPException(400, "the prompt is empty")
    if prompt_len >= context:
        raise HTTPException(
            400,
            f"the prompt ({prompt_len} tokens) exceeds the context of {target.info.name} "
            f"({context} tokens) with no room to generate",
        )
    room = context - prompt_len
    if max_tokens is None:
        max_tokens = min(room, limits.max_sample_tokens)
    if max_tokens < 0:
        raise HTTPException(400, f"max_tokens must be >= 0, got {max_tokens}")
    if max_tokens > limits.max_sample_tokens:
        raise HTTPException(
            400, f"max_tokens {max_tokens} is above the limit {limits.max_sample_tokens}"
        )
    if max_tokens > room:
        raise HTTPException(
            400,
            f"the prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context "
            f"of {target.info.name} ({context} tokens)",
        )
    if not 1 <= n <= limits.max_num_samples:
        raise HTTPException(400, f"n must be between 1 and {limits.max_num_samples}, got {n}")
    if not 0 <= temperature <= 2:
        raise HTTPException(400, f"temperature must be between 0 and 2, got {temperature}")
    if not 0 < top_p <= 1:
        raise HTTPException(400, f"top_p must be in (0, 1], got {top_p}")
    if top_k == 0 or top_k < -1:
        raise HTTPException(400, f"top_k must be -1 (off) or positive, got {top_k}")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise HTTPException(400, f"at most 4 stop sequences, got {len(stops)}")
    if any(not s for s in stops):
        raise HTTPException(400, "stop sequences must not be empty")
    return m.SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop_strings=tuple(stops),
    )
