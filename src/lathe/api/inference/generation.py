"""Run an inference request on the engine and decode what it sampled.

Each prompt becomes one `SampleRequest` (with `n` samples), exactly as `/asample` makes it, so
these requests share the engine's continuous batches, prefix cache and tenant fairness with
everything else. The adapter is loaded as an engine sampler on first use and kept, least
recently used first out (`sampler_cache`).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from typing import Any

from fastapi import HTTPException

from lathe.api.deps import Caller
from lathe.api.inference.decoding import Completion, decoded, tokenizer
from lathe.api.inference.model_ref import Target
from lathe.api.submit import json_result, submit
from lathe.api.usage_accounting import Usage
from lathe.protocol import messages as m

INFERENCE_SESSION = "inference"  # what usage records attribute these requests to


async def ensure_sampler(caller: Caller, target: Target) -> str:
    """The engine sampler of `target`'s weights, loaded on first use."""
    state = caller.state
    sampler_id = f"inference-{state.futures.replica_id[:8]}-{target.sampler_key()}"

    async def load() -> None:
        request = m.CreateSamplerRequest(sampler_id, target.info.name, target.directory)
        request_id, _ = await asyncio.to_thread(
            submit, caller, "create_sampling_session", None, request, json_result(lambda _: {})
        )
        await finished(caller, request_id)

    for old in await state.inference_samplers.get(sampler_id, load):
        state.engine.submit(m.Work("", m.UnloadRequest([], [old])))
    return sampler_id


async def finished(caller: Caller, request_id: str) -> bytes:
    """The payload of a finished future; its error as an HTTPException if it failed. If the
    client goes away meanwhile, a sample is cancelled in the engine."""
    state = caller.state
    try:
        while True:
            future = await state.futures.wait(request_id, 30.0, caller.user_id)
            assert future is not None
            if future.status != "pending":
                break
    except asyncio.CancelledError:
        state.engine.submit(m.Work("", m.CancelRequest([request_id])))
        raise
    if future.status == "failed":
        status = 503 if future.category == "retry" else 400
        if future.category == "server":
            status = 500
        raise HTTPException(status, future.error or "failed")
    return future.payload or b""


def sample_json(result: m.SampleResult) -> dict[str, Any]:
    def top(t: m.TopK | None) -> list | None:
        if t is None:
            return None
        return [
            list(zip(ids.tolist(), lps.tolist(), strict=True))
            for ids, lps in zip(t.token_ids, t.logprobs, strict=True)
        ]

    return {
        "sequences": [
            {
                "tokens": seq.tokens,
                "logprobs": seq.logprobs,
                "stop_reason": seq.stop_reason,
                "top": top(seq.topk),
            }
            for seq in result.sequences
        ],
        "prompt_logprobs": None
        if result.prompt_logprobs is None
        else [None if math.isnan(x) else x for x in result.prompt_logprobs],
        "prompt_top": top(result.prompt_topk),
    }


async def submit_sample(
    caller: Caller,
    target: Target,
    prompt: list[int],
    n: int,
    params: m.SamplingParams,
    top_k: int = 0,
    prompt_logprobs: bool = False,
    stream: bool = False,
) -> str:
    """Queue the sample request in the engine (its sampler loaded first); its request id."""
    state = caller.state
    if state.futures.pending("sample") >= state.settings.max_pending_samples:
        raise HTTPException(
            429, "sampling queue is full; retry shortly", headers={"retry-after": "1"}
        )
    sampler_id = await ensure_sampler(caller, target)
    request = m.SampleRequest(
        sampler_id,
        prompt,
        n,
        params,
        prompt_logprobs,
        topk_sample_logprobs=top_k,
        topk_prompt_logprobs=top_k if prompt_logprobs else 0,
        base_model=target.info.name,
        stream=stream,
    )
    usage = Usage("sampling", INFERENCE_SESSION, target.info.name, len(prompt))
    request_id, _ = await asyncio.to_thread(
        submit, caller, "sample", None, request, json_result(sample_json), "", usage
    )
    return request_id


def completion_of(
    target: Target, prompt_len: int, stops: tuple[str, ...], payload: bytes
) -> Completion:
    result = json.loads(payload)
    tok = tokenizer(target.info.path)
    choices = [decoded(tok, seq, stops) for seq in result["sequences"]]
    return Completion(choices, prompt_len, result["prompt_logprobs"], result["prompt_top"])


async def complete(
    caller: Caller,
    target: Target,
    prompt: list[int],
    n: int,
    params: m.SamplingParams,
    top_k: int = 0,
    prompt_logprobs: bool = False,
) -> Completion:
    """Sample `n` continuations of `prompt` (and score the prompt if asked), decoded."""
    request_id = await submit_sample(caller, target, prompt, n, params, top_k, prompt_logprobs)
    payload = await finished(caller, request_id)
    return completion_of(target, len(prompt), params.stop_strings, payload)


async def start_stream(
    caller: Caller, target: Target, prompt: list[int], n: int, params: m.SamplingParams
) -> AsyncIterator[tuple[list[list[int]], Completion | None]]:
    """Queue a streamed sample request; once it is queued (errors so far are raised here),
    returns an iterator of (new tokens per sequence, None) as the engine draws them, then
    ([], the decoded Completion). Closing the iterator early cancels the request."""
    request_id = await submit_sample(caller, target, prompt, n, params, stream=True)
    futures = caller.state.futures

    async def events() -> AsyncIterator[tuple[list[list[int]], Completion | None]]:
        try:
            done = False
            while not done:
                reports, done = await futures.next_progress(request_id, 30.0)
                for report in reports:
                    yield report.tokens, None
            payload = await finished(caller, request_id)
        except BaseException:  # the client went away (or the server stops): free the engine
            caller.state.engine.submit(m.Work("", m.CancelRequest([request_id])))
            raise
        yield [], completion_of(target, len(prompt), params.stop_strings, payload)

    return events()
