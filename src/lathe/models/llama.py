"""Llama 3 (and 3.1/3.2/3.3): the shared decoder (`decoder.py`) with Llama 3.1 RoPE scaling.

Module and parameter names follow Hugging Face's `LlamaForCausalLM`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lathe.models.decoder import DecoderForCausalLM


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int  # rows of the embedding and the unembedding
    hidden_size: int  # width of the residual stream
    intermediate_size: int  # width of the SwiGLU MLP
    num_hidden_layers: int  # transformer blocks
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # key/value heads (grouped-query attention)
    head_dim: int  # per-head width (hidden_size / heads unless the config says otherwise)
    rms_norm_eps: float = 1e-5  # epsilon of every RMSNorm
    rope_theta: float = 500_000.0  # RoPE base
    max_position_embeddings: int = 131_072  # context length the model was trained for
    tie_word_embeddings: bool = False  # unembedding shares the embedding matrix (Llama 3.2)
    attention_bias: bool = False  # biases on q/k/v/o projections
    mlp_bias: bool = False  # biases on the MLP projections
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # Llama 3.1 "llama3" frequency scaling

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> LlamaConfig:
        # Older configs say rope_theta/rope_scaling; transformers 5 writes rope_parameters.
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("llama3", "default"):
            raise ValueError(f"Llama RoPE type {kind!r} is not supported yet")
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        scaling = tuple((k, rope[k]) for k in keys) if kind == "llama3" else None
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 500_000.0)),
            max_position_embeddings=cfg.get("max_position_embeddings", 131_072),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", False),
            mlp_bias=cfg.get("mlp_bias", False),
            rope_scaling=scaling,
        )


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))  # (D/2,)
    if cfg.rope_scaling is None:
        return inv_freq
    # Llama 3.1 scaling: long wavelengths slowed by `factor`, short ones kept, a smooth
    # interpolation in between (same formula as the reference implementation).
    s = dict(cfg.rope_scaling)
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class LlamaForCausalLM(DecoderForCausalLM):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__(cfg, rope_inv_freq(cfg), qk_norm=False)


# The names models/loading.py looks up in every family file.
Config = LlamaConfig
CausalLM = LlamaForCausalLM
