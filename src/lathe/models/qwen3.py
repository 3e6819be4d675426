"""Qwen3 (dense): the shared decoder (`decoder.py`) with per-head RMSNorm on queries and keys.

Module and parameter names follow Hugging Face's `Qwen3ForCausalLM`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lathe.models.decoder import DecoderForCausalLM


@dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int  # rows of the embedding and the unembedding
    hidden_size: int  # width of the residual stream
    intermediate_size: int  # width of the SwiGLU MLP
    num_hidden_layers: int  # transformer blocks
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # key/value heads (grouped-query attention)
    head_dim: int  # per-head width; Qwen3 sets it explicitly (not hidden/heads)
    rms_norm_eps: float = 1e-6  # epsilon of every RMSNorm
    rope_theta: float = 1_000_000.0  # RoPE base
    max_position_embeddings: int = 40_960  # context length the model was trained for
    tie_word_embeddings: bool = False  # unembedding shares the embedding matrix
    attention_bias: bool = False  # biases on q/k/v/o projections
    mlp_bias: bool = False  # Qwen3's MLP never has biases

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> Qwen3Config:
        # Older configs say rope_theta/rope_scaling; transformers 5 writes rope_parameters.
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ValueError(f"Qwen3 RoPE type {kind!r} is not supported yet")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 1_000_000.0)),
            max_position_embeddings=cfg.get("max_position_embeddings", 40_960),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", False),
        )


def rope_inv_freq(cfg: Qwen3Config) -> torch.Tensor:
    d = cfg.head_dim
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))  # (D/2,)


class Qwen3ForCausalLM(DecoderForCausalLM):
    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__(cfg, rope_inv_freq(cfg), qk_norm=True)


# The names models/loading.py looks up in every family file.
Config = Qwen3Config
CausalLM = Qwen3ForCausalLM
