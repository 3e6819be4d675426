"""OpenAI-compatible inference, driven with the official `openai` client against a live server
with real keys: chat and text completions, streaming, n > 1, logprobs, stop strings, a LoRA
checkpoint as `model`, `GET /models`, and another user's checkpoint refused."""

from __future__ import annotations

import json
import time

import anthropic
import httpx
import openai
import pytest
import tinker
from tinker import types
from transformers import AutoTokenizer

from lathe.api.inference import chat_template
from lathe.local_server import LocalServer

from conftest import create_key

BASE = "tiny-qwen3"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tiny_qwen3, tmp_path_factory):
    """(server, alice's key, bob's key, alice's trained sampler checkpoint path)."""
    data = tmp_path_factory.mktemp("data")
    alice, bob = create_key("alice", data), create_key("bob", data)
    with LocalServer({BASE: tiny_qwen3}, data, dev=False) as srv:
        service = tinker.ServiceClient(base_url=srv.base_url, api_key=alice)
        training = service.create_lora_training_client(base_model=BASE, rank=4).result()
        ids = AutoTokenizer.from_pretrained(tiny_qwen3).encode(
            "The quick brown fox jumps over the lazy dog."
        )
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(ids[:-1]),
            loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)},
        )
        for _ in range(5):
            training.forward_backward([datum], "cross_entropy").result()
            training.optim_step(types.AdamParams(learning_rate=5e-2)).result()
        path = training.save_weights_for_sampler("trained").result().path
        yield srv, alice, bob, path, service


def client(srv, key: str, prefix: str = "/oai/api/v1") -> openai.OpenAI:  # noqa: ANN001
    return openai.OpenAI(base_url=srv.base_url + prefix, api_key=key, max_retries=0)


def test_chat_completion_of_the_base_model(served):
    srv, alice, *_ = served
    r = client(srv, alice).chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, seed=1
    )
    assert r.object == "chat.completion" and r.model == BASE
    assert len(r.choices) == 1 and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 1 <= r.usage.completion_tokens <= 8


def test_a_checkpoint_greedy_equals_the_sdk_greedy_sample(served, tiny_qwen3):
    """The checkpoint path as `model`: the chat reply at temperature 0 is the SDK's greedy
    sample of the same rendered prompt, token for token."""
    srv, alice, _, path, service = served
    messages = [{"role": "user", "content": "The quick brown"}]
    text = chat_template.load(tiny_qwen3).render(messages)
    sampler = service.create_sampling_client(model_path=path)
    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    prompt = tok.encode(text, add_special_tokens=False)
    params = types.SamplingParams(max_tokens=12, temperature=0.0)
    want = sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result().sequences[0]
    r = client(srv, alice).chat.completions.create(
        model=path, messages=messages, max_tokens=12, temperature=0.0, logprobs=True, top_logprobs=3
    )
    got = r.choices[0]
    for entry in got.logprobs.content:  # greedy: the drawn token is the most likely one
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
    assert got.message.content == tok.decode(want.tokens, skip_special_tokens=True)
    assert [c.logprob for c in got.logprobs.content] == pytest.approx(
        want.logprobs[: len(got.logprobs.content)], abs=1e-5
    )
    base = client(srv, alice).chat.completions.create(
        model=BASE, messages=messages, max_tokens=12, temperature=0.0
    )
    assert base.choices[0].message.content != got.message.content  # the adapter is applied


def test_n_samples_stream_and_usage(served):
    srv, alice, _, path, _ = served
    c = client(srv, alice, "/v1")
    stream = c.chat.completions.create(
        model=path,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=6,
        n=3,
        stream=True,
        stream_options={"include_usage": True},
        seed=7,
    )
    texts, finished, usage = {}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
            if ch.finish_reason:
                finished[ch.index] = ch.finish_reason
    assert sorted(texts) == [0, 1, 2] and sorted(finished) == [0, 1, 2]
    assert usage is not None and usage.completion_tokens >= 3
    same = c.chat.completions.create(
        model=path, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, n=3, seed=7
    )
    assert [ch.message.content for ch in same.choices] == [texts[i] for i in range(3)]


def test_text_completion_with_stop_logprobs_and_echo(served):
    srv, alice, _, path, _ = served
    c = client(srv, alice)
    r = c.completions.create(
        model=path, prompt="The quick brown", max_tokens=10, temperature=0.0, logprobs=2
    )
    choice = r.choices[0]
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs)
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    assert "".join(choice.logprobs.tokens).startswith(choice.text[:3])
    if len(choice.text) > 2:  # stop on a piece of the greedy text: it is cut there
        stop = choice.text[2:4]
        cut = c.completions.create(
            model=path, prompt="The quick brown", max_tokens=10, temperature=0.0, stop=[stop]
        )
        assert cut.choices[0].text == choice.text[: choice.text.index(stop)]
        assert cut.choices[0].finish_reason == "stop"
    scored = c.completions.create(
        model=path, prompt="The quick brown", max_tokens=0, echo=True, logprobs=0
    )
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == "The quick brown"
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])


def test_models_lists_base_and_own_checkpoints_only(served):
    srv, alice, bob, path, _ = served
    ids = [m.id for m in client(srv, alice).models.list()]
    assert BASE in ids and path in ids
    bob_ids = [m.id for m in client(srv, bob).models.list()]
    assert BASE in bob_ids and path not in bob_ids


def test_refusals_in_openai_shape(served):
    srv, alice, bob, path, _ = served
    with pytest.raises(openai.NotFoundError) as e:  # bob may not read alice's checkpoint
        client(srv, bob).chat.completions.create(
            model=path, messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client(srv, alice).completions.create(model="no-such-model", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        client(srv, "tml-wrong").completions.create(model=BASE, prompt="x")
    c = client(srv, alice)
    for bad in (
        {"n": 10_000},
        {"max_tokens": 10**7},
        {"temperature": 5.0},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"frequency_penalty": 1.0},
        {"prompt": "word " * 5000},
    ):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(**{"model": BASE, "prompt": "x", **bad})
        assert e.value.status_code == 400 and e.value.body["message"], bad
    r = httpx.post(
        srv.base_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {alice}"},
        json={"model": BASE, "messages": "not a list"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    nulls = {"temperature": None, "n": None, "stop": None, "seed": None, "top_p": None}
    r = httpx.post(  # some clients send every field, null when unset: the defaults apply
        srv.base_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {alice}"},
        json={"model": BASE, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        | nulls,
    )
    assert r.status_code == 200 and len(r.json()["choices"]) == 1, r.text


def anthropic_client(srv, key: str) -> anthropic.Anthropic:  # noqa: ANN001
    return anthropic.Anthropic(base_url=srv.base_url + "/anthropic/api", api_key=key, max_retries=0)


def test_anthropic_messages_plain_and_streamed(served):
    """The Messages API on the checkpoint: the streamed text and stop reason are the plain
    call's (greedy), and a stop sequence ends the message with its reason."""
    srv, alice, bob, path, _ = served
    c = anthropic_client(srv, alice)
    args = {
        "model": path,
        "max_tokens": 10,
        "extra_body": {"temperature": 0.0},  # the 2.x client has no sampling arguments
        "system": "Be brief.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "The quick"}]}],
    }
    plain = c.messages.create(**args)
    assert plain.type == "message" and plain.role == "assistant"
    assert plain.stop_reason in ("end_turn", "max_tokens")
    assert plain.usage.input_tokens > 0 and 1 <= plain.usage.output_tokens <= 10
    with c.messages.stream(**args) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == plain.content[0].text and final.stop_reason == plain.stop_reason
    text = plain.content[0].text
    if len(text) > 2:
        stopped = c.messages.create(**args, stop_sequences=[text[1:3]])
        assert stopped.content[0].text == text[: text.index(text[1:3])]
        assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", text[1:3])
    with pytest.raises(anthropic.NotFoundError):
        anthropic_client(srv, bob).messages.create(**args)
    with pytest.raises(anthropic.BadRequestError):
        c.messages.create(**{**args, "extra_body": {"temperature": 1.5}})


def test_streams_carry_tokens_as_they_are_drawn(served):
    """A long streamed completion: its first text arrives long before its end, and the
    streamed text is the plain call's (same seed)."""
    srv, alice, _, path, _ = served
    args = {"model": path, "prompt": "The", "max_tokens": 200, "seed": 3, "temperature": 1.0}
    plain = client(srv, alice).completions.create(**args)
    if plain.choices[0].finish_reason != "length":
        pytest.skip("this seed stopped early on this model")
    start = time.monotonic()
    first, text = None, ""
    for chunk in client(srv, alice).completions.create(**args, stream=True):
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.monotonic() - start
        text += chunk.choices[0].text if chunk.choices else ""
    total = time.monotonic() - start
    assert text == plain.choices[0].text
    assert first is not None and first < 0.5 * total, (first, total)


TOOL_REPLY = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
THINK_REPLY = "<think>\nforty plus two\n</think>\n\n42"
TAUGHT = {"Weather in Paris?": TOOL_REPLY, "What is 40 + 2?": THINK_REPLY}


@pytest.fixture(scope="module")
def taught(served, tiny_qwen3):
    """A sampler checkpoint that learned to answer TAUGHT's prompts with TAUGHT's replies."""
    _, alice, _, _, service = served
    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    template = chat_template.load(tiny_qwen3)
    data = []
    for question, answer in TAUGHT.items():
        prompt = tok.encode(template.render([{"role": "user", "content": question}]))
        reply = tok.encode(answer + "<|im_end|>", add_special_tokens=False)
        ids = prompt + reply
        weights = [0.0] * (len(prompt) - 1) + [1.0] * len(reply)
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(ids[:-1]),
                loss_fn_inputs={"target_tokens": ids[1:], "weights": weights},
            )
        )
    training = service.create_lora_training_client(base_model=BASE, rank=8).result()
    for _ in range(80):
        training.forward_backward(data, "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=3e-3)).result()
    return training.save_weights_for_sampler("taught").result().path


WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "weather", "parameters": {"type": "object"}},
}


def test_tool_calls_and_reasoning_are_split_out(served, taught):
    srv, alice, *_ = served
    c = client(srv, alice)
    ask = {"model": taught, "max_tokens": 100, "temperature": 0.0}
    called = c.chat.completions.create(
        messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL], **ask
    ).choices[0]
    assert called.finish_reason == "tool_calls" and called.message.content is None
    (call,) = called.message.tool_calls
    assert call.function.name == "weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    plain = c.chat.completions.create(
        messages=[{"role": "user", "content": "Weather in Paris?"}], **ask
    ).choices[0]
    assert plain.message.content == TOOL_REPLY and not plain.message.tool_calls  # no tools given
    thought = c.chat.completions.create(
        messages=[{"role": "user", "content": "What is 40 + 2?"}],
        extra_body={"separate_reasoning": True},
        **ask,
    ).choices[0]
    assert thought.message.content == "42"
    assert thought.message.model_extra["reasoning_content"] == "forty plus two"
    streamed = list(
        c.chat.completions.create(
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER_TOOL],
            stream=True,
            **ask,
        )
    )
    deltas = [d for ch in streamed for d in (ch.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas] == ["weather"]
    assert streamed[-1].choices[0].finish_reason == "tool_calls"


def test_published_checkpoints_and_base_semicolon_path(served):
    """`"<base>;<path>"` names the same weights as the path; a checkpoint its owner publishes
    is open to other users, as in the REST API; a wrong base is refused."""
    srv, alice, bob, path, service = served
    ask = {"messages": [{"role": "user", "content": "The quick"}], "max_tokens": 6}
    ask["temperature"] = 0.0
    by_path = client(srv, alice).chat.completions.create(model=path, **ask)
    both = client(srv, alice).chat.completions.create(model=f"{BASE};{path}", **ask)
    assert both.choices[0].message.content == by_path.choices[0].message.content
    rest = service.create_rest_client()
    rest.publish_checkpoint_from_tinker_path(path).result()
    try:
        as_bob = client(srv, bob).chat.completions.create(model=path, **ask)
        assert as_bob.choices[0].message.content == by_path.choices[0].message.content
    finally:
        rest.unpublish_checkpoint_from_tinker_path(path).result()
    with pytest.raises(openai.NotFoundError):
        client(srv, bob).chat.completions.create(model=path, **ask)
    with pytest.raises(openai.NotFoundError):
        client(srv, alice).chat.completions.create(model=f"other-base;{path}", **ask)
    with pytest.raises(openai.BadRequestError) as e:  # the context overflows
        client(srv, alice).chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": "word " * 5000}], max_tokens=4
        )
    assert e.value.body["code"] == "context_length_exceeded"
