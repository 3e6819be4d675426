"""The sampler against a plain forward pass: greedy path, logprobs, seeds and stops."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lathe.engine.runner import load_base_model
from lathe.protocol import messages as m
from lathe.protocol.messages import SamplingParams
from lathe.sampling.engine import SamplingEngine, Weights

PROMPT = [11, 42, 7, 99, 250, 3]


@pytest.fixture(scope="module")
def base(tiny_qwen3):
    return load_base_model("tiny", tiny_qwen3, torch.float32, "cpu")


def run(
    base,
    params: SamplingParams,
    n: int = 1,
    prompt_logprobs: bool = False,
    vocab=None,
    prompt=PROMPT,
    **options,
):
    """One request through a fresh sampling engine, stepped until it finishes."""
    engine = SamplingEngine(kv_budget_tokens=1 << 16)
    weights = Weights(base.module, None, vocab or base.vocab, "tiny")
    engine.add("r", m.SampleRequest("s", prompt, n, params, prompt_logprobs, **options), weights)
    done = []
    while engine.has_work():
        engine.step(done.append)
    assert done[0].error is None, done[0].error
    return done[0].result


def full_logits(base, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return base.module(torch.tensor([tokens]))[0].float()  # (T, V)


def no_stops(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, stop_at_eos=False, **kw)


def test_greedy_follows_argmax_of_full_forward(base):
    seq = run(base, no_stops(8, temperature=0.0)).sequences[0]
    tokens = list(PROMPT)
    for tok, lp in zip(seq.tokens, seq.logprobs, strict=True):
        logits = full_logits(base, tokens)[-1]
        assert tok == int(logits.argmax())
        assert lp == pytest.approx(float(torch.log_softmax(logits, -1)[tok]), abs=1e-5)
        tokens.append(tok)
    assert seq.stop_reason == "length" and len(seq.tokens) == 8


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_sampled_logprobs_are_those_of_the_tempered_distribution(base, temperature):
    res = run(base, no_stops(6, temperature=temperature, seed=5), n=3)
    for seq in res.sequences:
        logits = full_logits(base, PROMPT + seq.tokens)
        for i, (tok, lp) in enumerate(zip(seq.tokens, seq.logprobs, strict=True)):
            ref = torch.log_softmax(logits[len(PROMPT) - 1 + i] / temperature, -1)[tok]
            assert lp == pytest.approx(float(ref), abs=1e-5)


def test_top_k_and_top_p_renormalise_the_kept_tokens(base):
    seq = run(base, no_stops(4, temperature=1.0, top_k=5, seed=1)).sequences[0]
    logits = full_logits(base, PROMPT + seq.tokens)
    for i, (tok, lp) in enumerate(zip(seq.tokens, seq.logprobs, strict=True)):
        row = logits[len(PROMPT) - 1 + i]
        top = torch.topk(row, 5)
        assert tok in top.indices.tolist()
        ref = torch.log_softmax(top.values, -1)[top.indices.tolist().index(tok)]
        assert lp == pytest.approx(float(ref), abs=1e-5)
    one = run(base, no_stops(5, temperature=1.0, top_k=1, seed=2)).sequences[0].tokens
    assert one == run(base, no_stops(5, temperature=0.0)).sequences[0].tokens
    tiny_p = run(base, no_stops(5, temperature=1.0, top_p=1e-6, seed=3)).sequences[0]
    assert tiny_p.tokens == one and all(lp == 0.0 for lp in tiny_p.logprobs)


def test_seed_reproducible_and_independent_of_num_samples(base):
    params = no_stops(6, temperature=1.0, seed=1234)
    alone = run(base, params, n=1).sequences[0]
    together = run(base, params, n=3).sequences
    assert together[0].tokens == alone.tokens
    assert together[0].logprobs == pytest.approx(alone.logprobs, abs=1e-6)
    assert run(base, params, n=3).sequences == together
    assert len({tuple(s.tokens) for s in together}) > 1  # samples differ from each other
    other = run(base, dataclasses.replace(params, seed=99), n=1).sequences[0]
    assert other.tokens != alone.tokens


def test_stop_token_ids_end_the_sequence_and_are_kept(base):
    greedy = run(base, no_stops(10, temperature=0.0)).sequences[0].tokens
    stop_tok = greedy[3]
    first = greedy.index(stop_tok)
    seq = run(base, no_stops(10, temperature=0.0, stop_token_ids=(stop_tok,))).sequences[0]
    assert seq.tokens == greedy[: first + 1] and seq.stop_reason == "stop"


def test_stop_string_spanning_tokens_stops_when_complete(base):
    tok = base.vocab.tokenizer
    greedy = run(base, no_stops(12, temperature=0.0)).sequences[0].tokens
    texts = [tok.decode(greedy[:i]) for i in range(len(greedy) + 1)]
    # a two-character stop string: the last character of token i and the first of token i+1
    for i in range(1, len(greedy) - 1):
        at, after = texts[i + 1], texts[i + 2]
        if len(at) > len(texts[i]) and len(after) > len(at) and at[-1] + after[len(at)] not in at:
            stop = at[-1] + after[len(at)]
            break
    else:
        pytest.skip("no suitable token boundary in this greedy continuation")
    seq = run(base, no_stops(12, temperature=0.0, stop_strings=(stop,))).sequences[0]
    assert seq.tokens == greedy[: i + 2]
    assert stop in tok.decode(seq.tokens) and stop not in tok.decode(seq.tokens[:-1])
    assert seq.stop_reason == "stop"


def test_eos_stops_unless_stop_is_empty(base):
    greedy = run(base, no_stops(6, temperature=0.0)).sequences[0].tokens
    vocab = dataclasses.replace(base.vocab, eos_token_ids=frozenset({greedy[1]}))
    eos_on = SamplingParams(max_tokens=6, temperature=0.0)  # stop=None: stop at EOS
    assert (
        run(base, eos_on, vocab=vocab).sequences[0].tokens == greedy[: greedy.index(greedy[1]) + 1]
    )
    eos_off = SamplingParams(max_tokens=6, temperature=0.0, stop_at_eos=False)  # stop=[]
    seq = run(base, eos_off, vocab=vocab).sequences[0]
    assert seq.tokens == greedy and seq.stop_reason == "length"


def test_prompt_logprobs_match_full_forward(base):
    res = run(base, no_stops(0), prompt_logprobs=True)
    assert res.sequences[0].tokens == [] and res.sequences[0].stop_reason == "length"
    assert math.isnan(res.prompt_logprobs[0])
    logp = torch.log_softmax(full_logits(base, PROMPT), -1)
    for i in range(1, len(PROMPT)):
        assert res.prompt_logprobs[i] == pytest.approx(float(logp[i - 1, PROMPT[i]]), abs=1e-5)
