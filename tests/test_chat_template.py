"""Chat templates render here exactly as `transformers.apply_chat_template` renders them, and
decoded token pieces add up to the decoded text."""

from __future__ import annotations

import json
import random

import pytest
from transformers import AutoTokenizer

from lathe.api.inference import chat_template
from lathe.api.inference.decoding import TextStream, pieces_of, tokenizer
from lathe.testing.tiny_models import make_tiny
from lathe.testing.tiny_spec import TinyModelSpec

# A template in the style of Qwen3's: tools as JSON, tool calls and results, reasoning,
# namespace state, raise_exception and a {% generation %} block.
TOOLS_TEMPLATE = "\n".join(
    [
        "{%- if tools %}{{ '<|im_start|>system\\n# Tools\\n' }}{% for t in tools %}"
        "{{ t | tojson }}\n{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}",
        "{%- set ns = namespace(last_user=0) %}",
        "{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}"
        "{% endif %}{% endfor %}",
        "{%- for m in messages %}",
        "  {%- if m.role not in ['system', 'user', 'assistant', 'tool'] %}"
        "{{ raise_exception('bad role ' + m.role) }}{% endif %}",
        "  {%- if m.role == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}",
        "    {%- if m.reasoning_content and loop.index0 > ns.last_user %}"
        "{{ '<think>\\n' + m.reasoning_content + '\\n</think>\\n\\n' }}{% endif %}",
        "    {{- m.content or '' }}",
        "    {%- for c in m.tool_calls or [] %}{{ '<tool_call>\\n' + {'name': c.function.name, "
        "'arguments': c.function.arguments} | tojson + '\\n</tool_call>' }}{% endfor %}",
        "    {{- '<|im_end|>\\n' }}{% endgeneration %}",
        "  {%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
        "{% endif %}",
        "{%- endfor %}",
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    ]
)

MESSAGES = [
    {"role": "system", "content": "Be brief. Ünïcödé ✓"},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "reasoning": "Call the tool.",
        "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
        ],
    },
    {"role": "tool", "content": '{"temp": 21}'},
]
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def tiny_llama3(tmp_path_factory):
    return make_tiny(
        tmp_path_factory.mktemp("models") / "tiny-llama3", TinyModelSpec(family="llama")
    )


@pytest.mark.parametrize("family", ["qwen3", "llama3"])
def test_the_model_template_renders_as_transformers_does(family, tiny_qwen3, tiny_llama3):
    folder = tiny_qwen3 if family == "qwen3" else tiny_llama3
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "Hello <b>"}]
    mine = chat_template.load(folder).render(messages)
    theirs = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert mine == theirs


def test_tools_reasoning_and_template_features_render_as_transformers_does(tiny_qwen3, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_qwen3 / name).read_bytes())
    (folder / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    mine = chat_template.load(folder).render(MESSAGES, TOOLS)
    theirs = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        MESSAGES, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    assert mine == theirs
    assert "<think>\nCall the tool.\n</think>" in mine  # `reasoning` read as reasoning_content
    with pytest.raises(chat_template.TemplateError, match="bad role"):
        chat_template.load(folder).render([{"role": "robot", "content": "x"}])


def test_a_template_list_with_a_tool_use_entry(tiny_qwen3, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    config = json.loads((tiny_qwen3 / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "default", "template": "plain{{ messages | length }}"},
        {"name": "tool_use", "template": "tools{{ tools | length }}"},
    ]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    template = chat_template.load(folder)
    assert template.render(MESSAGES[:2]) == "plain2"
    assert template.render(MESSAGES[:2], TOOLS) == "tools1"


def test_token_pieces_add_up_to_the_decoded_text(tiny_qwen3):
    tok = tokenizer(tiny_qwen3)
    rng = random.Random(0)
    texts = ["Ünïcödé ✓ 漢字 emoji 🎉 and plain words", "<|im_end|> after a special token"]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert "".join(pieces_of(tok, ids)) == tok.decode(ids, skip_special_tokens=True)
    for _ in range(20):
        ids = [rng.randrange(tok.get_vocab_size()) for _ in range(30)]
        assert "".join(pieces_of(tok, ids)) == tok.decode(ids, skip_special_tokens=True)


def test_a_text_stream_releases_only_final_text(tiny_qwen3):
    """Streamed text never holds half a character or the start of a stop string, and all of
    it is a prefix of the final text, which it completes."""
    tok = tokenizer(tiny_qwen3)
    text = "Hello wörld 🎉 STOP after"
    ids = tok.encode(text, add_special_tokens=False).ids
    stream = TextStream(tok, ("STOP",))
    sent = ""
    for token in ids:
        piece = stream.add([token])
        assert "\ufffd" not in piece
        sent += piece
        assert text.startswith(sent) and "STOP" not in sent
    final = text[: text.index("STOP")]
    assert sent == final  # everything before the stop string was released before the end
    assert sent + stream.finish(final) == final
