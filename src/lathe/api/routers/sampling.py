"""Sampling sessions and sampling (`sample` and `compute_logprobs` both arrive as /asample)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from lathe.api import schemas as s
from lathe.api.deps import CallerDep
from lathe.api.submit import fingerprint, is_retry, submit
from lathe.api.validation import check_tokens
from lathe.api.wire import codec
from lathe.protocol import messages as m
from lathe.store import checkpoint_files, tinker_paths
from lathe.store.catalog import BaseModelInfo
from lathe.store.db import SamplingSessionRow

router = APIRouter(tags=["sampling"])


@router.post("/create_sampling_session")
def create_sampling_session(body: s.CreateSamplingSession, caller: CallerDep) -> dict:
    state = caller.state
    caller.session(body.session_id)
    sampler_id = tinker_paths.sampler_id_for(body.session_id, body.sampling_session_seq_id)
    existing = state.store.get(SamplingSessionRow, sampler_id)
    if existing is not None and existing.owner_id == caller.user_id:  # a retried POST
        return {"sampling_session_id": sampler_id, "type": "create_sampling_session"}
    directory = None
    if body.model_path:
        ckpt = caller.checkpoint(body.model_path)
        directory = ckpt.directory_path
        base_model = checkpoint_files.read_metadata(directory)["base_model"]
        if body.base_model and body.base_model != base_model:
            raise HTTPException(
                400, f"{body.model_path} was trained on {base_model!r}, not {body.base_model!r}"
            )
    elif body.base_model:
        base_model = body.base_model
    else:
        raise HTTPException(400, "send base_model or model_path")
    if base_model not in state.catalog:
        raise HTTPException(
            400, f"unknown base_model {base_model!r}; served: {', '.join(state.catalog)}"
        )
    state.store.add(
        SamplingSessionRow(
            sampler_id=sampler_id,
            owner_id=caller.user_id,
            session_id=body.session_id,
            base_model=base_model,
            model_path=body.model_path,
        )
    )
    # Unordered work runs first-come-first-served, so this load precedes any sample of it.
    submit(
        caller,
        "create_sampling_session",
        f"sampler:{sampler_id}",
        m.CreateSamplerRequest(sampler_id, base_model, directory),
        lambda _: ("", b""),
    )
    return {"sampling_session_id": sampler_id, "type": "create_sampling_session"}


@router.get("/samplers/{sampler_id}")
def get_sampler(sampler_id: str, caller: CallerDep) -> dict:
    row = caller.sampler(sampler_id)
    return {
        "sampler_id": row.sampler_id,
        "base_model": row.base_model,
        "model_path": row.model_path,
    }


def sampling_params(
    p: s.SamplingParamsIn, info: BaseModelInfo, prompt_len: int, default_max_tokens: int
) -> m.SamplingParams:
    room = info.max_context - prompt_len
    if p.max_tokens is not None and p.max_tokens < 0:
        raise HTTPException(400, f"max_tokens must be >= 0, got {p.max_tokens}")
    max_tokens = default_max_tokens if p.max_tokens is None else p.max_tokens
    if p.max_tokens is not None and max_tokens > room:
        raise HTTPException(
            400,
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) "
            f"exceeds the context of {info.name} ({info.max_context})",
        )
    if p.temperature < 0:
        raise HTTPException(400, f"temperature must be >= 0, got {p.temperature}")
    if not 0 < p.top_p <= 1:
        raise HTTPException(400, f"top_p must be in (0, 1], got {p.top_p}")
    if p.top_k == 0 or p.top_k < -1:
        raise HTTPException(400, f"top_k must be -1 (off) or positive, got {p.top_k}")
    stop = p.stop
    strings: tuple[str, ...] = ()
    token_ids: tuple[int, ...] = ()
    if isinstance(stop, str):
        strings = (stop,)
    elif stop:
        if all(isinstance(x, str) for x in stop):
            strings = tuple(stop)  # type: ignore[arg-type]
        else:
            token_ids = tuple(int(x) for x in stop)
            if any(not 0 <= t < info.vocab_size for t in token_ids):
                raise HTTPException(400, "stop token ids must be inside the vocabulary")
    if any(not x for x in strings):
        raise HTTPException(400, "stop strings must not be empty")
    return m.SamplingParams(
        max_tokens=min(max_tokens, max(room, 0)),
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        seed=p.seed,
        stop_strings=strings,
        stop_token_ids=token_ids,
        stop_at_eos=stop is None or len(stop) > 0,  # stop=[] turns off even EOS
    )


MAX_TOPK = 64


def scoring_options(body: s.Sample, prompt_len: int, info: BaseModelInfo) -> dict:
    """The prompt/sample scoring a request asks for, checked; SampleRequest keyword args."""
    if body.prompt_alt_tokens_k > 0:
        raise HTTPException(400, "not supported by this server yet: prompt_alt_tokens_k")
    for name in ("topk_prompt_logprobs", "topk_sample_logprobs"):
        if not 0 <= getattr(body, name) <= MAX_TOPK:
            raise HTTPException(400, f"{name} must be between 0 and {MAX_TOPK}")
    last_n = body.prompt_logprobs_last_n
    if last_n is not None and not body.prompt_logprobs:
        raise HTTPException(400, "prompt_logprobs_last_n needs prompt_logprobs=true")
    if last_n is not None and last_n < 0:
        raise HTTPException(400, "prompt_logprobs_last_n must be >= 0")
    target = None
    if body.target_prompt_logprobs is not None:
        try:
            target, _ = codec.decode_tensor_json(body.target_prompt_logprobs, pad=-1)
        except codec.WireError as e:
            raise HTTPException(400, f"target_prompt_logprobs: {e}") from None
        if target.ndim != 2 or target.shape[0] != prompt_len - 1 or target.dtype.kind != "i":
            raise HTTPException(
                400,
                f"target_prompt_logprobs must be int64 of shape "
                f"({prompt_len - 1}, K), got {target.dtype} {target.shape}",
            )
        if target.size and (target.min() < -1 or target.max() >= info.vocab_size):
            raise HTTPException(400, "target_prompt_logprobs ids must be in the vocabulary or -1")
    return {
        "prompt_logprobs_last_n": last_n,
        "topk_prompt_logprobs": body.topk_prompt_logprobs,
        "topk_sample_logprobs": body.topk_sample_logprobs,
        "target_prompt_ids": target,
    }


@router.post("/asample")
def asample(body: s.Sample, caller: CallerDep) -> dict:
    state = caller.state
    if not body.sampling_session_id:
        raise HTTPException(400, "sampling_session_id is required")
    sampler = caller.sampler(body.sampling_session_id)
    info = state.catalog[sampler.base_model]
    limits = state.settings.limits
    if not 1 <= body.num_samples <= limits.max_num_samples:
        raise HTTPException(
            400,
            f"num_samples must be between 1 and {limits.max_num_samples} (limit max_num_samples)",
        )
    if (body.sampling_params.max_tokens or 0) > limits.max_sample_tokens:
        raise HTTPException(
            400,
            f"max_tokens {body.sampling_params.max_tokens} is above the "
            f"limit max_sample_tokens={limits.max_sample_tokens}",
        )
    prompt: list[int] = []
    for chunk in body.prompt.chunks:
        if chunk.type != "encoded_text" or chunk.tokens is None:
            raise HTTPException(400, f"{chunk.type} prompt chunks are not supported")
        prompt.extend(chunk.tokens)
    if err := check_tokens(prompt, info, "prompt"):
        raise HTTPException(400, err)
    options = scoring_options(body, len(prompt), info)
    params = sampling_params(
        body.sampling_params, info, len(prompt), state.settings.default_max_tokens
    )
    key = None if body.seq_id is None else f"sample:{sampler.sampler_id}:{body.seq_id}"
    if not is_retry(state, key) and (
        state.futures.pending("sample") >= state.settings.max_pending_samples
    ):
        # The SDK's designed backpressure signal: it backs off and re-posts the same seq_id.
        raise HTTPException(
            429, "sampling queue is full; retry shortly", headers={"retry-after": "1"}
        )
    request = m.SampleRequest(
        sampler.sampler_id, prompt, body.num_samples, params, body.prompt_logprobs, **options
    )
    layout = body.target_prompt_logprobs  # the answer mirrors the request's tensor layout
    request_id, _ = submit(
        caller,
        "sample",
        key,
        request,
        lambda r: codec.sample_payload(r, layout),
        fingerprint(body),
    )
    return {
        "request_id": request_id,
        "sample_sequence_ids": [f"{request_id}:{i}" for i in range(body.num_samples)],
    }
