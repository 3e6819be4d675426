"""Tiny model folders must load in transformers exactly like real Qwen3 / Llama 3 checkpoints."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from lathe.testing.tiny_models import (
    TinyModelSpec,
    add_make_tiny_arguments,
    make_tiny,
    spec_from_args,
)

transformers = pytest.importorskip("transformers")

FAMILIES = ["qwen3", "llama"]
SPECIAL_TOKENS = {
    "qwen3": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
    "llama": [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
    ],
}
# NFC-normalised on purpose: Qwen's tokenizer normalises to NFC, like the real one.
ROUND_TRIP_TEXTS = [
    "Hello, world!",
    "The year 2024 had 366 days; π ≈ 3.14159.",
    "naïve café — Größe, 你好世界, こんにちは, emoji 🙂🚀",
    "def f(x):\n\treturn x ** 2  # tabs\r\nand CRLF",
    "   leading, trailing and  double  spaces   ",
    "a .  b ,c ' d n't",
    "\x00\x07 control bytes \x7f",
    "",
]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2 + 2?"},
]
EXPECTED_CHAT = {
    "qwen3": (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\n2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "llama": (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n2 + 2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
}


def build(tmp_path: Path, **kwargs) -> Path:
    return make_tiny(tmp_path / "model", TinyModelSpec(**kwargs))


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def folder(tmp_path: Path, family: str) -> Path:
    return build(tmp_path, family=family)


@pytest.fixture
def tokenizer(folder: Path):
    return transformers.AutoTokenizer.from_pretrained(folder)


def test_writes_expected_files(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not [p for p in folder.parent.iterdir() if p.name.endswith(".tmp")]


def test_tokenizer_loads_as_fast(tokenizer, family: str) -> None:
    assert tokenizer.is_fast
    expected = {"qwen3": "Qwen2Tokenizer", "llama": "TokenizersBackend"}[family]
    assert type(tokenizer).__name__ == expected


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tokenizer, folder: Path, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    # transformers rebuilds Qwen2Tokenizer from vocab + merges; it must match tokenizer.json.
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert ids == raw.encode(text, add_special_tokens=False).ids


def test_bos_only_for_llama(tokenizer, family: str) -> None:
    ids = tokenizer("hi")["input_ids"]
    plain = tokenizer("hi", add_special_tokens=False)["input_ids"]
    if family == "llama":
        assert ids == [tokenizer.convert_tokens_to_ids("<|begin_of_text|>"), *plain]
        assert tokenizer.decode(ids, skip_special_tokens=True) == "hi"
    else:
        assert ids == plain


def test_every_digit_is_one_token(tokenizer) -> None:
    digits = "0123456789" * 3
    ids = tokenizer(digits, add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode([i]) for i in ids] == list(digits)
    assert len(tokenizer("x = 31415926 + 27", add_special_tokens=False)["input_ids"]) >= 10


def test_special_tokens_are_single_ids_at_end(tokenizer, family: str) -> None:
    specials = SPECIAL_TOKENS[family]
    first = len(tokenizer) - len(specials)
    for offset, token in enumerate(specials):
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [first + offset]
        assert tokenizer.convert_ids_to_tokens(first + offset) == token
    if family == "qwen3":
        assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == (
            "<|im_end|>",
            "<|endoftext|>",
            None,
        )
        # Like Qwen3, think tags are plain added tokens and survive skip_special_tokens.
        ids = tokenizer("<think>x</think><|im_end|>", add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>x</think>"
    else:
        assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == (
            "<|eot_id|>",
            "<|finetune_right_pad_id|>",
            "<|begin_of_text|>",
        )


def test_chat_template(tokenizer, family: str) -> None:
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == EXPECTED_CHAT[family]
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    assert tokenizer.decode(ids) == text  # no second BOS from the post-processor


def test_qwen3_chat_template_can_disable_thinking(tmp_path: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(build(tmp_path, family="qwen3"))
    text = tokenizer.apply_chat_template(
        MESSAGES[1:2], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert (
        text
        == "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


@pytest.mark.parametrize("tied", [True, False])
def test_model_loads_every_weight(tmp_path: Path, family: str, tied: bool) -> None:
    folder = build(tmp_path, family=family, tie_word_embeddings=tied)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, output_loading_info=True
    )
    assert (
        type(model).__name__ == {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}[family]
    )
    assert info["missing_keys"] == set()
    assert info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set()

    saved = load_file(folder / "model.safetensors")
    state = model.state_dict()
    assert ("lm_head.weight" in saved) is not tied
    for name, tensor in saved.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(state[name], tensor), name
    embed = model.get_input_embeddings().weight
    if tied:
        assert model.lm_head.weight.data_ptr() == embed.data_ptr()
    else:
        assert not torch.equal(model.lm_head.weight, embed)

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert model.config.vocab_size == len(tokenizer) == embed.shape[0] == 512
    ids = torch.tensor([tokenizer("Hello 123")["input_ids"]])
    assert model(ids).logits.shape == (1, ids.shape[1], 512)


def test_qwen3_has_qk_norm_and_llama_does_not(tmp_path: Path, family: str) -> None:
    saved = load_file(build(tmp_path, family=family, num_layers=1) / "model.safetensors")
    assert ("model.layers.0.self_attn.q_norm.weight" in saved) is (family == "qwen3")
    assert not [name for name in saved if name.endswith(".bias")]


def test_config_values(folder: Path, tokenizer, family: str) -> None:
    config = transformers.AutoConfig.from_pretrained(folder)
    rope = config.rope_parameters
    ids = tokenizer.convert_tokens_to_ids
    generation = transformers.GenerationConfig.from_pretrained(folder)
    if family == "qwen3":
        assert (config.rms_norm_eps, rope["rope_theta"], rope["rope_type"]) == (
            1e-6,
            1e6,
            "default",
        )
        assert config.eos_token_id == ids("<|im_end|>")
        assert generation.eos_token_id == [ids("<|im_end|>"), ids("<|endoftext|>")]
    else:
        assert (config.rms_norm_eps, rope["rope_theta"], rope["rope_type"]) == (1e-5, 5e5, "llama3")
        assert config.bos_token_id == ids("<|begin_of_text|>")
        assert config.eos_token_id == [ids("<|end_of_text|>"), ids("<|eot_id|>")]


def test_llama3_rope_scaling_changes_frequencies(tmp_path: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(build(tmp_path, family="llama"))
    dim = model.config.head_dim
    unscaled = 1.0 / (500000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaled = model.model.rotary_emb.inv_freq
    assert torch.allclose(scaled[0], unscaled[0])  # high frequencies are kept
    assert not torch.allclose(scaled, unscaled)  # low ones are divided by the factor


def test_same_seed_is_byte_identical(tmp_path: Path, family: str) -> None:
    a = build(tmp_path / "a", family=family)
    b = build(tmp_path / "b", family=family)
    c = build(tmp_path / "c", family=family, seed=1)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_vocab_beyond_corpus_is_padded_with_reserved_tokens(tmp_path: Path, family: str) -> None:
    folder = build(tmp_path, family=family, vocab_size=2048)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == 2048
    assert tokenizer.convert_ids_to_tokens(2047) == SPECIAL_TOKENS[family][-1]
    assert "<|reserved_special_token_0|>" in tokenizer.get_vocab()
    assert tokenizer.decode(
        tokenizer("round 2048 trip")["input_ids"], skip_special_tokens=True
    ) == ("round 2048 trip")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"family": "gpt2"},
        {"num_layers": 0},
        {"hidden_size": -64},
        {"head_dim": 15},
        {"num_heads": 4, "num_kv_heads": 3},
        {"vocab_size": 260},
        {"vocab_size": 100},
        {"num_layers": 2.0},
        {"num_layers": True},
        {"seed": -1},
        {"tie_word_embeddings": "yes"},
        {"family": "llama", "hidden_size": 66},
        {"family": "llama", "max_position_embeddings": 64},
    ],
)
def test_invalid_spec_raises(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        TinyModelSpec(**kwargs)


def test_refuses_to_overwrite_a_non_empty_folder(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    make_tiny(out)  # an empty folder is fine
    with pytest.raises(FileExistsError):
        make_tiny(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp dir left behind


def test_cli_arguments_map_to_spec(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_make_tiny_arguments(parser)
    assert spec_from_args(parser.parse_args(["--out", str(tmp_path)])) == TinyModelSpec()
    args = parser.parse_args(
        "--family llama --out x --layers 3 --hidden-size 32 --intermediate-size 48 --heads 2 "
        "--kv-heads 1 --head-dim 16 --vocab-size 300 --seed 7 --untied".split()
    )
    assert args.out == Path("x")
    assert spec_from_args(args) == TinyModelSpec(
        family="llama",
        num_layers=3,
        hidden_size=32,
        intermediate_size=48,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        vocab_size=300,
        tie_word_embeddings=False,
        seed=7,
    )
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --out is required


def test_does_not_import_transformers() -> None:
    code = "import sys, lathe.testing.tiny_models; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
