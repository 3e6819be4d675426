"""Stop handling: after each sampled token, whether the sequence is finished."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

from lathe.protocol import messages as m


@dataclass(frozen=True)
class Vocabulary:
    """What the sampler needs to know about a base model's tokenizer."""

    tokenizer: Tokenizer | None  # for stop strings; None if the model ships no tokenizer.json
    eos_token_ids: frozenset[int]  # tokens that end a sequence when stop is null


class StopChecker:
    """Decides after each token whether a sequence is finished (the stop itself is kept)."""

    def __init__(self, params: m.SamplingParams, vocab: Vocabulary) -> None:
        self.token_ids = set(params.stop_token_ids)
        if params.stop_at_eos:
            self.token_ids |= vocab.eos_token_ids
        self.strings = params.stop_strings
        self.tokenizer = vocab.tokenizer
        # A stop string completed by the last token lies within this many trailing tokens
        # (every token decodes to at least one character, except special tokens).
        self.window = max((len(s) for s in self.strings), default=0) + 8
        if self.strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer.json next to the model")

    def is_stop(self, tokens: list[int]) -> bool:
        if tokens[-1] in self.token_ids:
            return True
        if self.strings and self.tokenizer is not None:
            tail = self.tokenizer.decode(tokens[-self.window :], skip_special_tokens=False)
            return any(s in tail for s in self.strings)
        return False
