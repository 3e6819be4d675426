"""Build tiny, randomly initialised Hugging Face-format causal LMs for tests and demos.

`make_tiny` writes a folder that `transformers` loads exactly like a real Qwen3 or Llama 3
checkpoint (same config keys, state-dict names, tokenizer files and chat template), but with a
few hundred KB of seeded random weights and a byte-level BPE tokenizer trained on a small corpus
shipped with the package. Nothing is downloaded.

This module deliberately does not import `transformers`: it is only a test dependency, and the
service must be able to build fixtures without it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lathe.store.atomic import atomic_dir
from lathe.testing.tiny_families import FAMILIES, LLAMA3_ROPE_SCALING, Family
from lathe.testing.tiny_spec import TinyModelSpec, add_make_tiny_arguments, spec_from_args
from lathe.testing.tiny_tokenizer import (
    build_tokenizer,
    special_tokens_map,
    tokenizer_config,
)

__all__ = ["TinyModelSpec", "add_make_tiny_arguments", "make_tiny", "spec_from_args"]

INIT_STD = 0.02  # `initializer_range` of both families


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
