"""Generation with a KV cache: prefill a prompt once, then draw `num_samples` continuations.

Scope: one prompt per call, its samples decoded together as one batch. Each sample draws
from its own random stream (seeded from the request seed and its index), so its tokens
depend only on the seed, the prompt and the weights, never on the other rows.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from torch import nn

from lathe.engine.lora import Adapter, RowGroup, use_adapters
from lathe.engine.messages import SampledSequence, SampleResult, SamplingParams
from lathe.models.kv_cache import KVCache
from lathe.sampling.logits import next_token_distribution


@dataclass(frozen=True)
class Vocabulary:
    """What the sampler needs to know about a base model's tokenizer."""

    tokenizer: Tokenizer | None  # for stop strings; None if the model ships no tokenizer.json
    eos_token_ids: frozenset[int]  # tokens that end a sequence when stop is null


def row_generators(seed: int | None, n: int, device: torch.device) -> list[torch.Generator]:
    base = secrets.randbits(63) if seed is None else seed % (2**63)
    gens = []
    for i in range(n):
        g = torch.Generator(device=device)
        # Distinct, reproducible stream per sample index.
        g.manual_seed((base * 1_000_003 + i) % (2**63))
        gens.append(g)
    return gens


class StopChecker:
    """Decides after each token whether a sequence is finished (the stop itself is kept)."""

    def __init__(self, params: SamplingParams, vocab: Vocabulary) -> None:
        self.token_ids = set(params.stop_token_ids)
        if params.stop_at_eos:
            self.token_ids |= vocab.eos_token_ids
        self.strings = params.stop_strings
        self.tokenizer = vocab.tokenizer
        if self.strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer.json next to the model")

    def is_stop(self, tokens: list[int]) -> bool:
        if tokens[-1] in self.token_ids:
            return True
        if self.strings and self.tokenizer is not None:
            # A stop string may span several tokens: look at the decoded tail.
            text = self.tokenizer.decode(tokens, skip_special_tokens=False)
            return any(s in text for s in self.strings)
        return False


@torch.no_grad()
def sample(
    model: nn.Module,
    adapter: Adapter | None,
    prompt: list[int],
    num_samples: int,
    params: SamplingParams,
    vocab: Vocabulary,
    prompt_logprobs: bool,
) -> SampleResult:
    device = next(model.parameters()).device
    stop = StopChecker(params, vocab)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, P)
    cache = KVCache(len(model.model.layers))
    with use_adapters([RowGroup(0, 1, adapter)]):
        logits = model(ids, cache).float()  # (1, P, V)
    scored = prompt_scores(logits[0], prompt) if prompt_logprobs else None
    if params.max_tokens == 0:
        return SampleResult([SampledSequence([], [], "length")] * num_samples, scored)

    n = num_samples
    cache = cache.repeat_rows(n)
    last = logits[:, -1].expand(n, -1)  # (n, V)
    gens = row_generators(params.seed, n, device)
    tokens: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    reasons: list[str | None] = [None] * n
    groups = [RowGroup(0, n, adapter)]
    for step in range(params.max_tokens):
        logp = next_token_distribution(last, params)  # (n, V) log-probs actually sampled from
        next_ids = []
        for r in range(n):
            if reasons[r] is not None:
                next_ids.append(0)  # finished rows ride along; their output is ignored
                continue
            tok = draw(logp[r], params.temperature, gens[r])
            tokens[r].append(tok)
            logprobs[r].append(float(logp[r, tok]))
            if stop.is_stop(tokens[r]):
                reasons[r] = "stop"
            next_ids.append(tok)
        if all(r is not None for r in reasons) or step == params.max_tokens - 1:
            break
        step_ids = torch.tensor(next_ids, dtype=torch.long, device=device)[:, None]  # (n, 1)
        with use_adapters(groups):
            last = model(step_ids, cache)[:, -1].float()
    seqs = [
        SampledSequence(tokens[r], logprobs[r], "stop" if reasons[r] == "stop" else "length")
        for r in range(n)
    ]
    return SampleResult(seqs, scored)


def draw(logp: torch.Tensor, temperature: float, gen: torch.Generator) -> int:
    """One token from log-probs (V,): argmax when greedy, else inverse-CDF with the row's RNG."""
    if temperature == 0:
        return int(torch.argmax(logp))
    u = torch.rand((), generator=gen, device=logp.device)
    cdf = torch.cumsum(logp.exp(), dim=0)
    # Token i covers [cdf[i-1], cdf[i]); excluded tokens (probability 0) cover nothing.
    tok = int(torch.searchsorted(cdf, u * cdf[-1], right=True))
    if tok >= logp.shape[0]:  # u * total rounded up to the total: take the last allowed token
        tok = int(torch.nonzero(logp > -math.inf)[-1])
    return tok


def prompt_scores(logits: torch.Tensor, prompt: list[int]) -> list[float]:
    """logp(prompt[i] | prompt[:i]) for every position; NaN at 0, which has no context."""
    logp = torch.log_softmax(logits[:-1], dim=-1)  # (P-1, V)
    targets = torch.tensor(prompt[1:], device=logits.device)
    picked = logp.gather(-1, targets[:, None])[:, 0]
    return [math.nan] + picked.tolist()
