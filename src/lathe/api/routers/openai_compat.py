"""OpenAI-compatible inference: `/chat/completions`, `/completions` and `/models`, mounted at
`/oai/api/v1` (Tinker's layout) and `/v1`. `model` is a base model or a checkpoint path
(`inference/model_ref.py`). Streams carry tokens as the engine draws them (with logprobs,
split reasoning, tool calls or several prompts, once the completion is ready)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, HTTPException
from fastapi.responses import StreamingResponse

from lathe.api.inference import chat_template, decoding, generation
from lathe.api.inference import openai_api as oai
from lathe.api.inference.auth import InferenceCaller
from lathe.api.inference.model_ref import resolve
from lathe.store.db import as_utc

router = APIRouter(tags=["openai-compatible"])
MAX_LISTED = 1000  # checkpoints in GET /models (the REST API pages through all of them)


def stream(chunks) -> StreamingResponse:  # noqa: ANN001 - an iterator of SSE strings
    return StreamingResponse(chunks, media_type="text/event-stream")


@router.post("/chat/completions")
async def chat_completions(req: oai.ChatRequest, caller: InferenceCaller):  # noqa: ANN201
    req.check()
    target = await asyncio.to_thread(resolve, caller, req.model)
    text = chat_template.load(target.info.path).render(
        req.template_messages(), req.tools, True, **(req.chat_template_kwargs or {})
    )
    prompt = decoding.encode(target.info.path, text)
    params = req.sampling(caller, target, len(prompt), req.limit())
    tok = decoding.tokenizer(target.info.path)
    if req.stream and not (req.logprobs or req.separate_reasoning or req.parses_tool_calls()):
        events = await generation.start_stream(caller, target, prompt, req.n, params)
        return stream(oai.live_chat_chunks(req, tok, params.stop_strings, events))
    top = (req.top_logprobs or 0) if req.logprobs else 0
    completion = await generation.complete(caller, target, prompt, req.n, params, top)
    if req.stream:  # logprobs, split reasoning or tool calls: sent once the reply is ready
        return stream(oai.chat_chunks(req, tok, completion))
    return oai.chat_response(req, tok, completion)


@router.post("/completions")
async def completions(req: oai.CompletionRequest, caller: InferenceCaller):  # noqa: ANN201
    req.check()
    target = await asyncio.to_thread(resolve, caller, req.model)
    tok = decoding.tokenizer(target.info.path)
    prompts = []
    for p in req.prompts():
        ids = decoding.encode(target.info.path, p) if isinstance(p, str) else list(p)
        if any(not 0 <= t < target.info.vocab_size for t in ids):
            raise HTTPException(400, "prompt token ids must be inside the vocabulary")
        text = p if isinstance(p, str) else tok.decode(ids, skip_special_tokens=False)
        prompts.append((ids, text, req.sampling(caller, target, len(ids), req.max_tokens)))
    if req.stream and len(prompts) == 1 and req.logprobs is None:
        ids, _, params = prompts[0]
        events = await generation.start_stream(caller, target, ids, req.n, params)
        return stream(oai.live_completion_chunks(req, tok, params.stop_strings, events))
    top = req.logprobs or 0
    echo_scores = req.echo and req.logprobs is not None
    done = await asyncio.gather(
        *(
            generation.complete(caller, target, ids, req.n, params, top, echo_scores)
            for ids, _, params in prompts
        )
    )
    choices = [
        oai.completion_choice(req, tok, ids, text, completion, choice, i * req.n + j)
        for i, ((ids, text, _), completion) in enumerate(zip(prompts, done, strict=True))
        for j, choice in enumerate(completion.choices)
    ]
    response = oai.completion_response(req, choices, list(done))
    if req.stream:
        return stream(oai.completion_chunks(req, response))
    return response


@router.get("/models")
def models(caller: InferenceCaller) -> dict:
    """The served base models and the caller's checkpoints, newest first."""
    state = caller.state
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "lathe"} for name in state.catalog
    ]
    rows, _ = state.store.checkpoints_of_user(caller.user_id, MAX_LISTED, 0)
    for row in rows:
        data.append(
            {
                "id": row.tinker_path,
                "object": "model",
                "created": int(as_utc(row.created_at).timestamp()),
                "owned_by": caller.user.name,
            }
        )
    return {"object": "list", "data": data}
