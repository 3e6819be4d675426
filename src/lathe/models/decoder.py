"""The decoder both families share: pre-norm blocks of grouped-query attention with RoPE and
a SwiGLU MLP, as in Hugging Face's `LlamaForCausalLM`. A family file (`llama.py`, `qwen3.py`)
reads its config and says what differs: its RoPE frequencies, biases, and whether queries and
keys are normalised per head (Qwen3). Module and parameter names follow Hugging Face's, so a
checkpoint's state dict loads as is and LoRA adapters use PEFT's key names. LoRA is not known
here: it is applied from outside by walking the module tree (`models/lora.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lathe.models import fused


class DecoderConfig(Protocol):
    """What the decoder reads from a family's config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.rms_norm = fused.rms_norm  # eager, or compiled by fused.compile_elementwise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int, qk_norm: bool) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.d = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.d, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.d, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.d, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.d, cfg.hidden_size, bias=bias)
        # Qwen3 normalises queries and keys per head before RoPE; Llama does not.
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps) if qk_norm else nn.Identity()
        self.rope = fused.rope

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: Attend
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.d)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.d)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.d).transpose(1, 2)
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)  # (B, H, T, D)
        y = attention(self.layer_idx, q, k, v)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.d))


# (layer index, q (B, H, T, D), k (B, H_kv, T, D), v) -> (B, H, T, D). The default is causal
# attention within the batch; the sampler passes one that reads and extends its KV cache.
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def causal_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        bias = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)
        self.swiglu = fused.swiglu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int, qk_norm: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx, qk_norm)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attention):  # shapes as in the causal LM forward
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Named `model` inside the causal LM, matching the checkpoint keys `model.*`."""

    def __init__(self, cfg: DecoderConfig, qk_norm: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i, qk_norm) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DecoderForCausalLM(nn.Module):
    """The causal LM of a family: its config, its RoPE frequencies, whether it norms q and k."""

    def __init__(self, cfg: DecoderConfig, inv_freq: torch.Tensor, qk_norm: bool) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg, qk_norm)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention: Attend = causal_attention,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V)."""
        return self.lm_head(self.hidden_states(input_ids, positions, attention))

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention: Attend = causal_attention,
    ) -> torch.Tensor:
        """input_ids (B, T) -> final normed hidden states (B, T, hidden), before lm_head.

        positions (B, T) default to 0..T-1 for every row; a sampler packing several sequences
        into one row passes each token's own position and an `attention` that keeps them apart.
        """
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, D)
        x = self.model.embed_tokens(input_ids)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, attention)
        return self.model.norm(x)
