"""OpenAI's chat and text completions: requests, and the responses and stream chunks built
from a `generation.Completion`.

Extensions other OpenAI-compatible servers also take: `top_k` (vLLM), `chat_template_kwargs`
(vLLM; e.g. `{"enable_thinking": false}`) and `separate_reasoning` (SGLang: a reasoning model's
`<think>…</think>` goes to `message.reasoning_content`). Unknown fields are ignored, as clients
send provider-specific ones; known ones this server cannot honour are refused with a 400.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tokenizers import Tokenizer

from lathe.api.deps import Caller
from lathe.api.inference.decoding import Choice, Completion, TextStream
from lathe.api.inference.model_ref import Target
from lathe.api.inference.params import nulls_dropped, sampling_params
from lathe.protocol import messages as m

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


class StreamOptions(BaseModel):
    include_usage: bool = False


class CommonRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    _nulls = model_validator(mode="before")(nulls_dropped)

    model: str
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def sampling(
        self, caller: Caller, target: Target, prompt_len: int, max_tokens: int | None
    ) -> m.SamplingParams:
        return sampling_params(
            caller,
            target,
            prompt_len,
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=self.stop,
            n=self.n,
        )

    def refuse_unsupported(self) -> None:
        if self.presence_penalty or self.frequency_penalty:
            raise HTTPException(400, "presence_penalty and frequency_penalty are not supported")
        if self.logit_bias:
            raise HTTPException(400, "logit_bias is not supported")


class ChatRequest(CommonRequest):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    separate_reasoning: bool = False

    def check(self) -> None:
        self.refuse_unsupported()
        if self.response_format and self.response_format.get("type") != "text":
            raise HTTPException(400, "response_format other than text is not supported")
        if self.tool_choice not in (None, "auto", "none"):
            raise HTTPException(400, "tool_choice other than 'auto' or 'none' is not supported")
        if self.top_logprobs and not self.logprobs:
            raise HTTPException(400, "top_logprobs needs logprobs=true")

    def parses_tool_calls(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_tokens is None else self.max_tokens

    def template_messages(self) -> list[dict[str, Any]]:
        """The messages as chat templates read them: text parts joined into one string."""
        out = []
        for message in self.messages:
            if "role" not in message:
                raise HTTPException(400, "every message needs a role")
            content = message.get("content")
            if isinstance(content, list):
                texts = []
                for part in content:
                    if not isinstance(part, dict) or part.get("type") != "text":
                        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                        raise HTTPException(
                            400, f"{kind} content is not supported: the served models read text"
                        )
                    texts.append(str(part.get("text", "")))
                message = {**message, "content": "".join(texts)}
            out.append(message)
        return out


class CompletionRequest(CommonRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for text completions
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check(self) -> None:
        self.refuse_unsupported()
        if self.suffix:
            raise HTTPException(400, "suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise HTTPException(400, "best_of other than n is not supported")
        if self.echo and self.stream:
            raise HTTPException(400, "echo is not supported with stream")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]  # type: ignore[list-item]
        if not p:
            raise HTTPException(400, "prompt must not be empty")
        return list(p)  # type: ignore[arg-type]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def token_text(tok: Tokenizer, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tok: Tokenizer, choice: Choice) -> dict[str, Any]:
    content = []
    for i in range(choice.kept):
        text = token_text(tok, choice.tokens[i])
        top = choice.top[i] if choice.top else []
        content.append(
            {
                "token": text,
                "logprob": choice.logprobs[i],
                "bytes": list(text.encode()),
                "top_logprobs": [
                    {"token": (t := token_text(tok, tid)), "logprob": lp, "bytes": list(t.encode())}
                    for tid, lp in top
                ],
            }
        )
    return {"content": content, "refusal": None}


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a reasoning model's output; (None, text) if it did not think."""
    if THINK_CLOSE in text:
        reasoning, _, answer = text.partition(THINK_CLOSE)
        return reasoning.removeprefix(THINK_OPEN).strip("\n"), answer.lstrip("\n")
    if text.lstrip().startswith(THINK_OPEN):  # cut off while thinking
        return text.lstrip().removeprefix(THINK_OPEN).lstrip("\n"), ""
    return None, text


def tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool calls) of a reply that calls tools in the `<tool_call>{json}</tool_call>`
    format of Qwen's and Hermes' templates; a block that is not a call stays in the content."""
    calls, kept = [], []
    for match in TOOL_CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
            name, arguments = call["name"], call.get("arguments", {})
        except (ValueError, KeyError, TypeError):
            continue
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        function = {"name": name, "arguments": arguments}
        calls.append({"id": new_id("call"), "type": "function", "function": function})
        kept.append(match)
    if not calls:
        return text, []
    content = text
    for match in reversed(kept):
        content = content[: match.start()] + content[match.end() :]
    return content.strip() or None, calls


def usage(completions: list[Completion]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in completions)
    generated = sum(len(ch.tokens) for c in completions for ch in c.choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": generated,
        "total_tokens": prompt + generated,
    }


def reply(req: ChatRequest, choice: Choice) -> tuple[dict[str, Any], str]:
    """The assistant message of a choice (reasoning and tool calls split out as asked) and
    its finish reason."""
    message: dict[str, Any] = {"role": "assistant", "content": choice.text}
    if req.separate_reasoning:
        message["reasoning_content"], message["content"] = split_reasoning(choice.text)
    if req.parses_tool_calls() and message["content"]:
        message["content"], calls = tool_calls(message["content"])
        if calls:
            message["tool_calls"] = calls
            return message, "tool_calls"
    return message, choice.finish_reason


def chat_response(req: ChatRequest, tok: Tokenizer, completion: Completion) -> dict[str, Any]:
    choices = []
    for index, choice in enumerate(completion.choices):
        message, finish = reply(req, choice)
        choices.append(
            {
                "index": index,
                "message": message,
                "logprobs": chat_logprobs(tok, choice) if req.logprobs else None,
                "finish_reason": finish,
            }
        )
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": choices,
        "usage": usage([completion]),
    }


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def chat_chunks(req: ChatRequest, tok: Tokenizer, completion: Completion) -> Iterator[str]:
    """The stream of a finished chat completion: a role chunk, a content chunk per token,
    a finish chunk per choice, the usage chunk if asked, then [DONE]."""
    base = {
        "id": new_id("chatcmpl"),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": req.model,
    }

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs=None) -> str:  # noqa: ANN001
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse({**base, "choices": [choice]})

    for index, choice in enumerate(completion.choices):
        yield chunk(index, {"role": "assistant", "content": ""})
        logprobs = chat_logprobs(tok, choice)["content"] if req.logprobs else None
        message, finish = reply(req, choice)
        if "reasoning_content" in message or "tool_calls" in message:  # each in one delta
            if message.get("reasoning_content") is not None:
                yield chunk(index, {"reasoning_content": message["reasoning_content"]})
            if message["content"]:
                yield chunk(index, {"content": message["content"]})
            for k, call in enumerate(message.get("tool_calls", [])):
                yield chunk(index, {"tool_calls": [{"index": k, **call}]})
        else:
            for i in range(choice.kept):
                piece = choice.pieces[i]
                if i == choice.kept - 1:  # a stop string may end inside the last token
                    piece = choice.text[len("".join(choice.pieces[:i])) :]
                lp = {"content": [logprobs[i]], "refusal": None} if logprobs else None
                if piece or lp:
                    yield chunk(index, {"content": piece}, logprobs=lp)
        yield chunk(index, {}, finish)
    if req.stream_options and req.stream_options.include_usage:
        yield sse({**base, "choices": [], "usage": usage([completion])})
    yield sse("[DONE]")


Events = AsyncIterator[tuple[list[list[int]], Completion | None]]


async def live_chunks(
    base: dict[str, Any],
    n: int,
    tok: Tokenizer,
    stops: tuple[str, ...],
    events: Events,
    delta: Callable[[int, str], dict[str, Any]],
    finish: Callable[[int, Choice], dict[str, Any]],
    usage_chunk: bool,
) -> AsyncIterator[str]:
    """SSE chunks of a streamed request as the engine draws its tokens: `delta(index, text)`
    for new text of choice `index`, `finish(index, choice)` when it ends, the usage chunk if
    asked, then [DONE]. An engine failure mid-stream ends it with an error object."""
    streams = [TextStream(tok, stops) for _ in range(n)]
    try:
        async for tokens, completion in events:
            if completion is None:
                for index, new in enumerate(tokens):
                    if piece := streams[index].add(new):
                        yield sse({**base, "choices": [delta(index, piece)]})
                continue
            for index, choice in enumerate(completion.choices):
                if rest := streams[index].finish(choice.text):
                    yield sse({**base, "choices": [delta(index, rest)]})
                yield sse({**base, "choices": [finish(index, choice)]})
            if usage_chunk:
                yield sse({**base, "choices": [], "usage": usage([completion])})
    except HTTPException as e:
        kind = "server_error" if e.status_code >= 500 else "invalid_request_error"
        yield sse({"error": {"message": e.detail, "type": kind, "param": None, "code": None}})
    yield sse("[DONE]")


def live_chat_chunks(
    req: ChatRequest, tok: Tokenizer, stops: tuple[str, ...], events: Events
) -> AsyncIterator[str]:
    base = {
        "id": new_id("chatcmpl"),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": req.model,
    }

    def choice(index: int, delta: dict, finish: str | None = None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

    async def chunks() -> AsyncIterator[str]:
        for index in range(req.n):
            yield sse({**base, "choices": [choice(index, {"role": "assistant", "content": ""})]})
        async for chunk in live_chunks(
            base,
            req.n,
            tok,
            stops,
            events,
            lambda index, text: choice(index, {"content": text}),
            lambda index, c: choice(index, {}, c.finish_reason),
            bool(req.stream_options and req.stream_options.include_usage),
        ):
            yield chunk

    return chunks()


def live_completion_chunks(
    req: CompletionRequest, tok: Tokenizer, stops: tuple[str, ...], events: Events
) -> AsyncIterator[str]:
    base = {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": req.model,
    }

    def choice(index: int, text: str, finish: str | None = None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

    return live_chunks(
        base,
        req.n,
        tok,
        stops,
        events,
        lambda index, text: choice(index, text),
        lambda index, c: choice(index, "", c.finish_reason),
        bool(req.stream_options and req.stream_options.include_usage),
    )


def completion_logprobs(
    tok: Tokenizer, tokens: list[int], logprobs: list[float | None], top: list | None, offset0: int
) -> dict[str, Any]:
    texts = [token_text(tok, t) for t in tokens]
    offsets, at = [], offset0
    for t in texts:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": texts,
        "token_logprobs": logprobs,
        "top_logprobs": [
            {token_text(tok, tid): lp for tid, lp in row} if row else None for row in top
        ]
        if top is not None
        else [None] * len(tokens),
        "text_offset": offsets,
    }


def completion_choice(
    req: CompletionRequest,
    tok: Tokenizer,
    prompt: list[int],
    prompt_text: str,
    completion: Completion,
    choice: Choice,
    index: int,
) -> dict[str, Any]:
    text = prompt_text + choice.text if req.echo else choice.text
    logprobs = None
    if req.logprobs is not None:
        k = req.logprobs
        gen_top = [row[:k] for row in choice.top[: choice.kept]] if k and choice.top else None
        generated = completion_logprobs(
            tok,
            choice.tokens[: choice.kept],
            list(choice.logprobs[: choice.kept]),
            gen_top,
            len(prompt_text) if req.echo else 0,
        )
        if req.echo:
            top = completion.prompt_top
            prompt_top = [None] + [row[:k] for row in top[1:]] if k and top else None
            scored = completion_logprobs(
                tok, prompt, list(completion.prompt_logprobs or []), prompt_top, 0
            )
            generated = {key: scored[key] + generated[key] for key in generated}
        logprobs = generated
    return {
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": choice.finish_reason,
    }


def completion_response(
    req: CompletionRequest, choices: list[dict], used: list[Completion]
) -> dict:
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": choices,
        "usage": usage(used),
    }


def completion_chunks(req: CompletionRequest, response: dict[str, Any]) -> Iterator[str]:
    base = {k: response[k] for k in ("id", "object", "created", "model")}
    for choice in response["choices"]:
        yield sse({**base, "choices": [{**choice, "finish_reason": None}]})
        yield sse({**base, "choices": [{**choice, "text": "", "logprobs": None}]})
    if req.stream_options and req.stream_options.include_usage:
        yield sse({**base, "choices": [], "usage": response["usage"]})
    yield sse("[DONE]")
