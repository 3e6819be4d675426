"""Anthropic-compatible inference: `POST /messages`, mounted at `/anthropic/api/v1` and
`/anthropic/v1` (an Anthropic client with `base_url=<server>/anthropic/api` or
`<server>/anthropic`). `model` is a base model or a checkpoint path, as for the OpenAI-compatible
endpoints; the key comes as `x-api-key`."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from lathe.api.inference import anthropic_api, chat_template, decoding, generation
from lathe.api.inference.auth import InferenceCaller
from lathe.api.inference.model_ref import resolve
from lathe.api.inference.params import sampling_params

router = APIRouter(tags=["anthropic-compatible"])


@router.post("/messages")
async def messages(req: anthropic_api.MessagesRequest, caller: InferenceCaller):  # noqa: ANN201
    target = await asyncio.to_thread(resolve, caller, req.model)
    chat, prefill = req.chat()
    template = chat_template.load(target.info.path)
    text = template.render(chat, req.template_tools(), True) + prefill
    prompt = decoding.encode(target.info.path, text)
    params = sampling_params(
        caller,
        target,
        len(prompt),
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        stop=req.stop_sequences,
    )
    if req.stream:
        events = await generation.start_stream(caller, target, prompt, 1, params)
        tok = decoding.tokenizer(target.info.path)
        return StreamingResponse(
            anthropic_api.live_events(req, tok, len(prompt), events),
            media_type="text/event-stream",
        )
    completion = await generation.complete(caller, target, prompt, 1, params)
    return anthropic_api.message(req, completion)
