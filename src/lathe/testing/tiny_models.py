"""Build tiny, randomly initialised Hugging Face-format causal LMs for tests and demos.

`make_tiny` writes a folder that `transformers` loads exactly like a real Qwen3 or Llama 3
checkpoint (same config keys, state-dict names, tokenizer files and chat template), but with a
few hundred KB of seeded random weights and a byte-level BPE tokenizer trained on a small corpus
shipped with the package. Nothing is downloaded.

This module deliberately does not import `transformers`: it is only a test dependency, and the
service must be able to build fixtures without it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lathe.store.atomic import atomic_dir
from lathe.testing.tiny_families import FAMILIES, LLAMA3_ROPE_SCALING, Family
from lathe.testing.tiny_tokenizer import (
    BYTE_ALPHABET_SIZE,
    build_tokenizer,
    special_tokens_map,
    tokenizer_config,
)

__all__ = ["TinyModelSpec", "add_make_tiny_arguments", "make_tiny", "spec_from_args"]

INIT_STD = 0.02  # `initializer_range` of both families

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


def make_tiny(out_dir: str | Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:  # noqa: B008
    """Write a tiny Hugging Face model folder for `spec` into `out_dir` and return its path.

    Writes config.json, generation_config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json and special_tokens_map.json. The folder is assembled in a temporary
    directory beside `out_dir` and renamed into place, so readers never see a partial model.
    `out_dir` must not exist or be an empty directory. The same spec always gives a
    byte-identical model.safetensors and an identical tokenizer.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty directory")
    with atomic_dir(out) as tmp:  # also replaces an empty `out` directory
        _write_model_folder(tmp, spec)
    return out


def _write_model_folder(folder: Path, spec: TinyModelSpec) -> None:
    family = FAMILIES[spec.family]
    tokenizer = build_tokenizer(spec.family, spec.vocab_size)
    ids = {token: tokenizer.token_to_id(token) for token in family.special_tokens}
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer_config_json = tokenizer_config(spec.family, tokenizer, spec.max_position_embeddings)
    _write_json(folder / "tokenizer_config.json", tokenizer_config_json)
    _write_json(folder / "special_tokens_map.json", special_tokens_map(family))
    _write_json(folder / "config.json", _model_config(spec, ids))
    _write_json(folder / "generation_config.json", _generation_config(family, ids))
    save_file(_init_weights(spec), str(folder / "model.safetensors"), metadata={"format": "pt"})


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", "utf-8")


# --- weights -----------------------------------------------------------------------------------


def _weight_shapes(spec: TinyModelSpec) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Yield (state-dict name, shape) in the order the HF module registers them.

    That order is also the order random values are drawn in, so it must never change: doing so
    would silently change every tiny model built from an existing seed.
    """
    h, d = spec.hidden_size, spec.head_dim
    yield "model.embed_tokens.weight", (spec.vocab_size, h)
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        yield f"{p}.self_attn.q_proj.weight", (spec.num_heads * d, h)
        yield f"{p}.self_attn.k_proj.weight", (spec.num_kv_heads * d, h)
        yield f"{p}.self_attn.v_proj.weight", (spec.num_kv_heads * d, h)
        yield f"{p}.self_attn.o_proj.weight", (h, spec.num_heads * d)
        if FAMILIES[spec.family].has_qk_norm:
            yield f"{p}.self_attn.q_norm.weight", (d,)
            yield f"{p}.self_attn.k_norm.weight", (d,)
        yield f"{p}.mlp.gate_proj.weight", (spec.intermediate_size, h)
        yield f"{p}.mlp.up_proj.weight", (spec.intermediate_size, h)
        yield f"{p}.mlp.down_proj.weight", (h, spec.intermediate_size)
        yield f"{p}.input_layernorm.weight", (h,)
        yield f"{p}.post_attention_layernorm.weight", (h,)
    yield "model.norm.weight", (h,)
    if not spec.tie_word_embeddings:
        yield "lm_head.weight", (spec.vocab_size, h)


def _init_weights(spec: TinyModelSpec) -> dict[str, torch.Tensor]:
    """Seeded fp32 weights: matrices ~ N(0, 0.02) like HF's init, RMSNorm scales = 1."""
    generator = torch.Generator().manual_seed(spec.seed)
    weights: dict[str, torch.Tensor] = {}
    for name, shape in _weight_shapes(spec):
        if len(shape) == 1:  # only norms are 1-D (no biases in either family)
            weights[name] = torch.ones(shape, dtype=torch.float32)
        else:
            weights[name] = torch.randn(shape, generator=generator, dtype=torch.float32) * INIT_STD
    return weights


# --- configs -----------------------------------------------------------------------------------


def _token_ids(names: tuple[str, ...], ids: dict[str, int]) -> int | list[int]:
    """One id as a plain int, several as a list: the shapes real configs use."""
    return ids[names[0]] if len(names) == 1 else [ids[name] for name in names]


def _model_config(spec: TinyModelSpec, ids: dict[str, int]) -> dict[str, Any]:
    family = FAMILIES[spec.family]
    config: dict[str, Any] = {
        "architectures": [family.architecture],
        "model_type": spec.family,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": family.rms_norm_eps,
        "rope_theta": family.rope_theta,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": INIT_STD,
        "bos_token_id": ids[family.config_bos_token] if family.config_bos_token else None,
        "eos_token_id": _token_ids(family.config_eos_tokens, ids),
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if spec.family == "qwen3":
        config |= {
            "rope_scaling": None,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": spec.num_layers,
        }
    else:
        config |= {
            "rope_scaling": dict(LLAMA3_ROPE_SCALING),
            "mlp_bias": False,
            "pretraining_tp": 1,
        }
    return config


def _generation_config(family: Family, ids: dict[str, int]) -> dict[str, Any]:
    return {
        **family.generation_defaults,
        "bos_token_id": ids[family.config_bos_token] if family.config_bos_token else None,
        "eos_token_id": _token_ids(family.generation_eos_tokens, ids),
        "pad_token_id": ids[family.pad_token],
    }


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
