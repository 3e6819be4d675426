"""From next-token logits to the distribution a sample is drawn from.

The returned log-probabilities are those of the distribution actually sampled: logits divided
by the temperature, then restricted to the top-k tokens and to the smallest top-p nucleus,
renormalised. Sampled-token logprobs are read from it, so an RL learner sees the probability
with which each token was really chosen. Greedy decoding (temperature 0) picks the argmax
and reports its log-probability under the untempered distribution (temperature 1).
"""

from __future__ import annotations

import torch

from lathe.protocol.messages import SamplingParams


def next_token_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits (n, V) -> log-probs (n, V); excluded tokens get -inf."""
    logits = logits.float()
    if params.temperature > 0:
        logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (n, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        logits = top_p_filter(logits, params.top_p)
    return torch.log_softmax(logits, dim=-1)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # A token is dropped when the tokens before it already reach top_p (the first is kept).
    before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
