"""What a tiny test model is (`TinyModelSpec`) and the `make-tiny` CLI options.

No torch here: `lathe`'s argument parser is built from this module, and `lathe serve`'s API
process must not load torch. Building the model is testing/tiny_models.py.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from lathe.testing.tiny_families import FAMILIES, LLAMA3_ROPE_SCALING
from lathe.testing.tiny_tokenizer import BYTE_ALPHABET_SIZE

_SIZE_FIELDS = (
    "num_layers",
    "hidden_size",
    "intermediate_size",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
)


def _is_int(value: object) -> bool:
    # bool is an int subclass, but True as a size or seed is always a mistake.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TinyModelSpec:
    """What `make_tiny` builds."""

    family: str = "qwen3"
    """Model family: "qwen3" or "llama"."""
    num_layers: int = 2
    """Number of decoder layers (`num_hidden_layers`)."""
    hidden_size: int = 64
    """Width of the residual stream and of the embeddings."""
    intermediate_size: int = 128
    """Width of the SwiGLU MLP."""
    num_heads: int = 4
    """Number of query heads."""
    num_kv_heads: int = 2
    """Number of key/value heads (grouped-query attention); must divide `num_heads`."""
    head_dim: int = 16
    """Size of each attention head; must be even for RoPE."""
    vocab_size: int = 512
    """Total vocabulary, special tokens included: embedding rows == len(tokenizer)."""
    max_position_embeddings: int = 2048
    """Context length written to the config and used as the tokenizer's `model_max_length`."""
    tie_word_embeddings: bool = True
    """Share the embedding matrix with the LM head (no `lm_head.weight` is written)."""
    seed: int = 0
    """Seed of the generator all random weights are drawn from."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; expected one of {sorted(FAMILIES)}")
        self._validate_sizes()
        self._validate_vocab()
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(
                f"tie_word_embeddings must be a bool, got {self.tie_word_embeddings!r}"
            )
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.family == "llama":
            self._validate_llama()

    def _validate_sizes(self) -> None:
        for name in _SIZE_FIELDS:
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}")

    def _validate_vocab(self) -> None:
        n_special = len(FAMILIES[self.family].special_tokens)
        if self.vocab_size < BYTE_ALPHABET_SIZE + n_special:
            raise ValueError(
                f"vocab_size must be at least {BYTE_ALPHABET_SIZE + n_special} for {self.family} "
                f"({BYTE_ALPHABET_SIZE} byte-level tokens + {n_special} special tokens), "
                f"got {self.vocab_size}"
            )

    def _validate_llama(self) -> None:
        # transformers' LlamaConfig rejects these; fail here with the reason instead.
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"llama needs hidden_size ({self.hidden_size}) divisible by num_heads "
                f"({self.num_heads})"
            )
        original = LLAMA3_ROPE_SCALING["original_max_position_embeddings"]
        if self.max_position_embeddings <= original:
            raise ValueError(
                f"llama needs max_position_embeddings > {original} (the llama3 rope scaling's "
                f"original context), got {self.max_position_embeddings}"
            )


# --- CLI ---------------------------------------------------------------------------------------


def add_make_tiny_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `make-tiny` options; `spec_from_args` turns the parsed result into a spec."""
    d = TinyModelSpec()
    parser.add_argument("--family", choices=sorted(FAMILIES), default=d.family)
    parser.add_argument("--out", required=True, type=Path, help="model folder to create")
    parser.add_argument("--layers", type=int, default=d.num_layers)
    parser.add_argument("--hidden-size", type=int, default=d.hidden_size)
    parser.add_argument("--intermediate-size", type=int, default=d.intermediate_size)
    parser.add_argument("--heads", type=int, default=d.num_heads)
    parser.add_argument("--kv-heads", type=int, default=d.num_kv_heads)
    parser.add_argument("--head-dim", type=int, default=d.head_dim)
    parser.add_argument(
        "--vocab-size", type=int, default=d.vocab_size, help="total, special tokens included"
    )
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--untied", action="store_true", help="write a separate lm_head instead of tying it"
    )


def spec_from_args(args: argparse.Namespace) -> TinyModelSpec:
    """Build the spec from `add_make_tiny_arguments` options; raises ValueError if invalid."""
    return TinyModelSpec(
        family=args.family,
        num_layers=args.layers,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        vocab_size=args.vocab_size,
        tie_word_embeddings=not args.untied,
        seed=args.seed,
    )
