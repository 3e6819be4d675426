"""Anthropic's Messages API: requests rendered with the model's chat template, and the
message (or its event stream) built from a `generation.Completion`.

Text content only; a trailing assistant message is continued (Anthropic's prefill); tools are
passed to the template in the OpenAI function shape that templates read.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tokenizers import Tokenizer

from lathe.api.inference.decoding import Choice, Completion, TextStream
from lathe.api.inference.params import nulls_dropped


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    _nulls = model_validator(mode="before")(nulls_dropped)

    model: str
    max_tokens: int = Field(ge=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    temperature: float = Field(default=1.0, ge=0, le=1)
    top_p: float = 1.0
    top_k: int = -1
    stream: bool = False
    tools: list[dict[str, Any]] | None = None

    def chat(self) -> tuple[list[dict[str, Any]], str]:
        """(messages for the chat template, text of a trailing assistant turn to continue)."""
        messages = []
        if self.system:
            messages.append({"role": "system", "content": text_of(self.system)})
        for message in self.messages:
            if message.get("role") not in ("user", "assistant"):
                raise HTTPException(400, "messages: roles must be 'user' or 'assistant'")
            messages.append({"role": message["role"], "content": text_of(message.get("content"))})
        prefill = ""
        if messages[-1]["role"] == "assistant":
            prefill = messages.pop()["content"]
        return messages, prefill

    def template_tools(self) -> list[dict[str, Any]] | None:
        if not self.tools:
            return None
        return [
            {
                "type": "function",
                "function": {
                    "name": t.get("name"),
                    "description": t.get("description", ""),
                    "parameters": t.get("input_schema", {}),
                },
            }
            for t in self.tools
        ]


Events = AsyncIterator[tuple[list[list[int]], Completion | None]]


def text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise HTTPException(400, "content must be a string or a list of content blocks")
    texts = []
    for block in content:
        if not isinstance(block, dict) or block.get("type") != "text":
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise HTTPException(400, f"{kind} content blocks are not supported: text only")
        texts.append(str(block.get("text", "")))
    return "".join(texts)


def stop_reason(choice: Choice) -> str:
    if choice.stop_sequence is not None:
        return "stop_sequence"
    return "max_tokens" if choice.finish_reason == "length" else "end_turn"


def message(req: MessagesRequest, completion: Completion) -> dict[str, Any]:
    choice = completion.choices[0]
    return {
        "id": f"msg_{uuid.uuid4().hex}",
        "type": "message",
        "role": "assistant",
        "model": req.model,
        "content": [{"type": "text", "text": choice.text}],
        "stop_reason": stop_reason(choice),
        "stop_sequence": choice.stop_sequence,
        "usage": {"input_tokens": completion.prompt_tokens, "output_tokens": len(choice.tokens)},
    }


def event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n"


def start_event(req: MessagesRequest, prompt_tokens: int) -> str:
    start: dict[str, Any] = {
        "id": f"msg_{uuid.uuid4().hex}",
        "type": "message",
        "role": "assistant",
        "model": req.model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": prompt_tokens, "output_tokens": 0},
    }
    return event("message_start", {"message": start})


def end_events(completion: Completion) -> Iterator[str]:
    choice = completion.choices[0]
    yield event("content_block_stop", {"index": 0})
    delta = {"stop_reason": stop_reason(choice), "stop_sequence": choice.stop_sequence}
    yield event("message_delta", {"delta": delta, "usage": {"output_tokens": len(choice.tokens)}})
    yield event("message_stop", {})


def text_delta(text: str) -> str:
    return event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": text}})


async def live_events(
    req: MessagesRequest, tok: Tokenizer, prompt_tokens: int, events: Events
) -> AsyncIterator[str]:
    """The event stream of a message as the engine draws its tokens. An engine failure
    mid-stream ends it with an error event."""
    yield start_event(req, prompt_tokens)
    yield event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    yield event("ping", {})
    text = TextStream(tok, tuple(req.stop_sequences or ()))
    try:
        async for tokens, completion in events:
            if completion is None:
                if piece := text.add(tokens[0]):
                    yield text_delta(piece)
                continue
            if rest := text.finish(completion.choices[0].text):
                yield text_delta(rest)
            for e in end_events(completion):
                yield e
    except HTTPException as e:
        kind = "api_error" if e.status_code >= 500 else "invalid_request_error"
        yield event("error", {"error": {"type": kind, "message": e.detail}})
