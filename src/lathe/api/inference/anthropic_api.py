"""Anthropic's Messages API: requests rendered with the model's chat template, and the
message (or its event stream) built from a `generation.Completion`.

Text content only; a trailing assistant message is continued (Anthropic's prefill); tools are
passed to the template in the OpenAI function shape that templates read.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field

from lathe.api.inference.generation import Choice, Completion


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

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


def events(req: MessagesRequest, completion: Completion) -> Iterator[str]:
    """The event stream of a finished message, in the order Anthropic sends it."""
    whole = message(req, completion)
    choice = completion.choices[0]
    start = {**whole, "content": [], "stop_reason": None, "stop_sequence": None}
    start["usage"] = {"input_tokens": completion.prompt_tokens, "output_tokens": 0}
    yield event("message_start", {"message": start})
    yield event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    yield event("ping", {})
    sent = 0
    for piece in choice.pieces[: choice.kept]:
        piece = piece[: max(0, len(choice.text) - sent)]  # a stop string may end inside it
        sent += len(piece)
        if piece:
            delta = {"type": "text_delta", "text": piece}
            yield event("content_block_delta", {"index": 0, "delta": delta})
    yield event("content_block_stop", {"index": 0})
    delta = {"stop_reason": whole["stop_reason"], "stop_sequence": whole["stop_sequence"]}
    usage = {"output_tokens": whole["usage"]["output_tokens"]}
    yield event("message_delta", {"delta": delta, "usage": usage})
    yield event("message_stop", {})
