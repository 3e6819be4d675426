"""What differs between the tiny model families: tokens, chat template, config constants.

Shared by the weight/config builder (`tiny_models`) and the tokenizer builder (`tiny_tokenizer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# Verbatim from Meta-Llama-3-8B-Instruct (3.1+ only adds tool-calling and a dated system prompt).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """Everything that differs between the supported model families."""

    architecture: str
    special_tokens: tuple[str, ...]  # appended at the very end of the vocabulary, in this order
    non_special_tokens: frozenset[str]  # added tokens that decode even with skip_special_tokens
    bos_token: str | None  # what the tokenizer prepends; None = nothing
    eos_token: str  # the tokenizer's eos: end of an assistant turn
    pad_token: str
    extra_special_tokens: tuple[str, ...]  # `additional_special_tokens` of the tokenizer config
    config_bos_token: str | None
    config_eos_tokens: tuple[str, ...]  # a single entry is written as an int, like the originals
    generation_eos_tokens: tuple[str, ...]  # generate() stops on any of these
    generation_defaults: dict[str, Any]
    rms_norm_eps: float
    rope_theta: float
    chat_template: str
    tokenizer_class: str
    has_qk_norm: bool  # Qwen3 RMS-normalises q and k per head before RoPE
    nfc_normalize: bool  # Qwen's tokenizer NFC-normalises its input; Llama 3's does not


FAMILIES: dict[str, Family] = {
    "qwen3": Family(
        architecture="Qwen3ForCausalLM",
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
        # Qwen3 marks its think tags as non-special so decoded reasoning keeps them.
        non_special_tokens=frozenset({"<think>", "</think>"}),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=("<|im_start|>", "<|im_end|>"),
        # Real Qwen3 configs name <|endoftext|> as bos although the tokenizer never adds it.
        config_bos_token="<|endoftext|>",
        config_eos_tokens=("<|im_end|>",),
        generation_eos_tokens=("<|im_end|>", "<|endoftext|>"),
        generation_defaults={"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95},
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        chat_template=QWEN3_CHAT_TEMPLATE,
        tokenizer_class="Qwen2Tokenizer",
        has_qk_norm=True,
        nfc_normalize=True,
    ),
    "llama": Family(
        architecture="LlamaForCausalLM",
        special_tokens=(
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|finetune_right_pad_id|>",
        ),
        non_special_tokens=frozenset(),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        extra_special_tokens=(),
        config_bos_token="<|begin_of_text|>",
        # Llama 3.x Instruct stops on any of these (it also lists <|eom_id|>, which we omit).
        config_eos_tokens=("<|end_of_text|>", "<|eot_id|>"),
        generation_eos_tokens=("<|end_of_text|>", "<|eot_id|>"),
        generation_defaults={"do_sample": True, "temperature": 0.6, "top_p": 0.9},
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        chat_template=LLAMA3_CHAT_TEMPLATE,
        tokenizer_class="PreTrainedTokenizerFast",
        has_qk_norm=False,
        nfc_normalize=False,
    ),
}

# Llama 3.1's rope scaling with a tiny original context, so that the scaling actually changes
# the rotary frequencies at the short sequence lengths tests use.
LLAMA3_ROPE_SCALING: dict[str, Any] = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
