"""Sampled tokens as text: what each token adds, the text of a finished sample (cut at its
stop string), and the text of a streamed one as it becomes final."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer


@dataclass
class Choice:
    """One sampled continuation, decoded."""

    tokens: list[int]
    pieces: list[str]  # the text each token adds ('' for special tokens and split characters)
    logprobs: list[float]
    top: list[list[tuple[int, float]]] | None  # the k most likely tokens at each position
    text: str  # the continuation, cut before a stop string it contains
    finish_reason: str  # stop | length
    stop_sequence: str | None  # the stop string that ended it, if one did
    kept: int  # how many leading tokens make up `text`


@dataclass
class Completion:
    choices: list[Choice]
    prompt_tokens: int
    prompt_logprobs: list[float | None] | None  # first entry None (no context)
    prompt_top: list[list[tuple[int, float]]] | None


@lru_cache(maxsize=16)
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def encode(model_dir: Path, text: str) -> list[int]:
    """The prompt's tokens; special tokens written in the text (a chat template's markers)
    become those tokens, and nothing is added around it."""
    return tokenizer(model_dir).encode(text, add_special_tokens=False).ids


def pieces_of(tok: Tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds: their concatenation is the decoded text. A token that ends
    inside a UTF-8 character adds '' and the token that completes it adds the character."""
    pieces: list[str] = []
    start = 0
    for i in range(len(ids)):
        text = tok.decode(ids[start : i + 1], skip_special_tokens=True)
        if text.endswith("\ufffd") and i + 1 < len(ids):  # wait for the rest of the character
            pieces.append("")
            continue
        pieces.append(text)
        start = i + 1
    return pieces


def decoded(tok: Tokenizer, seq: dict[str, Any], stops: tuple[str, ...]) -> Choice:
    pieces = pieces_of(tok, seq["tokens"])
    text = "".join(pieces)
    cut, stop_sequence = len(text), None
    for stop in stops:  # the earliest stop string ends the text (it is not part of it)
        at = text.find(stop)
        if 0 <= at < cut:
            cut, stop_sequence = at, stop
    kept, length = 0, 0
    while kept < len(pieces) and length < cut:
        length += len(pieces[kept])
        kept += 1
    top = [[(int(i), float(lp)) for i, lp in row] for row in seq["top"]] if seq["top"] else None
    return Choice(
        seq["tokens"],
        pieces,
        seq["logprobs"],
        top,
        text[:cut],
        seq["stop_reason"],
        stop_sequence,
        kept,
    )


class TextStream:
    """The text of one streamed sequence, released once it is final: never half a UTF-8
    character, nor text that could still be the start of a stop string (which is cut)."""

    def __init__(self, tok: Tokenizer, stops: tuple[str, ...]) -> None:
        self.tok, self.stops = tok, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.tokens: list[int] = []
        self.sent = 0  # characters released

    def add(self, tokens: list[int]) -> str:
        self.tokens += tokens
        text = self.tok.decode(self.tokens, skip_special_tokens=True).rstrip("\ufffd")
        cut = len(text) - self.hold
        for stop in self.stops:
            if (at := text.find(stop)) >= 0:
                cut = min(cut, at)
        piece = text[self.sent : max(cut, self.sent)]
        self.sent += len(piece)
        return piece

    def finish(self, final_text: str) -> str:
        """The rest of the sequence's final text (cut at its stop string)."""
        return final_text[self.sent :]
