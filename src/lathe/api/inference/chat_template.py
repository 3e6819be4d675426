"""A model's own chat template, rendered as `transformers.apply_chat_template` renders it.

The template comes from the model folder (`chat_template.jinja`, else `tokenizer_config.json`'s
`chat_template`, a string or a list of named templates of which "default" is used, or
"tool_use" when tools are given and there is one). It runs in jinja2's immutable sandbox with
the globals `transformers` gives templates (`raise_exception`, `strftime_now`, a `tojson`
that does not escape HTML), and sees the tokenizer's special tokens (`bos_token`, ...) as
`transformers` passes them, so a prompt rendered here is the prompt a user gets with the model's
tokenizer.
"""

from __future__ import annotations

import datetime as dt
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Older names of a message's reasoning; templates read `reasoning_content` (gpt-oss: `thinking`).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token")


class TemplateError(ValueError):
    """The messages cannot be rendered (the template refused them, or there is none)."""


class ChatTemplate:
    def __init__(self, source: str, named: dict[str, str], special_tokens: dict[str, str]):
        self.source = source
        self.named = named  # "tool_use" and other named templates, when the model has them
        self.special_tokens = special_tokens

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        source = self.named.get("tool_use", self.source) if tools else self.source
        # Like transformers: keys set to None are dropped, reasoning is aliased under its names.
        chat = [aliased({k: v for k, v in msg.items() if v is not None}) for msg in messages]
        try:
            return compiled(source).render(
                messages=chat,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens, **kwargs},
            )
        except jinja2.TemplateError as e:
            raise TemplateError(f"the model's chat template refused these messages: {e}") from e


def aliased(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


@lru_cache(maxsize=16)
def load(model_dir: Path) -> ChatTemplate:
    """The chat template of a model folder (read once: served folders do not change);
    TemplateError if it has none."""
    config_file = model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    named: dict[str, str] = {}
    source = config.get("chat_template")
    if isinstance(source, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t["name"]: t["template"] for t in source}
        source = named.get("default")
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        source = jinja_file.read_text()
    if not source:
        raise TemplateError(
            f"{model_dir.name} has no chat template; render the prompt yourself and use "
            "/completions"
        )
    special = {name: token_text(config[name]) for name in SPECIAL_TOKEN_NAMES if config.get(name)}
    return ChatTemplate(source, named, special)


def token_text(value: str | dict[str, Any]) -> str:
    return value["content"] if isinstance(value, dict) else value  # an AddedToken as JSON


class GenerationBlocks(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-token mask): the block
    renders as its content; the mask itself is for training, not needed here."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


@lru_cache(maxsize=32)
def compiled(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, GenerationBlocks],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: dt.datetime.now().strftime(fmt)
    return env.from_string(source)


def tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:  # noqa: ANN001
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)
