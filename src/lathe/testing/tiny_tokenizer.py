"""Train the tiny models' byte-level BPE tokenizer and write its Hugging Face config files.

The tokenizer is trained on a small corpus shipped with the package (testing/data), so nothing
is downloaded; the trainer is deterministic, so the same family and size give the same tokenizer.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from lathe.testing.tiny_families import FAMILIES, Family

# The Qwen2/Qwen3 pre-tokenizer regex. `\p{N}` (one digit per chunk) is what makes every digit
# its own token; Llama 3's `\p{N}{1,3}` would let BPE merge digit runs, so both families use this.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BYTE_ALPHABET_SIZE = 256


def build_tokenizer(family_name: str, vocab_size: int) -> Tokenizer:
    """Train the family's byte-level BPE on the shipped corpus; exactly `vocab_size` tokens.

    Ids: learned BPE tokens first, then reserved filler tokens (only when the corpus cannot
    support enough merges), then the family's special tokens, which therefore always take the
    last ids.
    """
    family = FAMILIES[family_name]
    regular_target = vocab_size - len(family.special_tokens)
    tokenizer = Tokenizer(models.BPE())
    if family.nfc_normalize:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=regular_target,
        show_progress=False,
        # The full byte alphabet, even bytes absent from the corpus, so any text encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # One document, so newline runs are learned too. The trainer is deterministic: ties between
    # equally frequent pairs are broken by token id, not by hash order.
    tokenizer.train_from_iterator([_corpus_text()], trainer)

    learned = tokenizer.get_vocab_size()
    if learned > regular_target:
        raise RuntimeError(f"BPE trainer produced {learned} tokens, asked for {regular_target}")
    # The ~60 KB corpus supports only ~1,300 tokens; pad with never-produced reserved tokens,
    # like Llama 3's <|reserved_special_token_N|>, so the total is still exactly vocab_size.
    # One call for all of them: adding tokens one by one rebuilds the matcher each time.
    tokenizer.add_special_tokens(
        [
            AddedToken(f"<|reserved_special_token_{i}|>", special=True, normalized=False)
            for i in range(regular_target - learned)
        ]
    )
    for content in family.special_tokens:
        # One at a time, in the listed order, to pin their ids.
        if content in family.non_special_tokens:
            tokenizer.add_tokens([AddedToken(content, special=False, normalized=False)])
        else:
            tokenizer.add_special_tokens([AddedToken(content, special=True, normalized=False)])
    tokenizer.post_processor = _post_processor(family, tokenizer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"built {tokenizer.get_vocab_size()} tokens, expected {vocab_size}")
    return tokenizer


def _post_processor(family: Family, tokenizer: Tokenizer) -> processors.PostProcessor:
    byte_level = processors.ByteLevel(trim_offsets=False)
    if family.bos_token is None:
        return byte_level
    bos = family.bos_token
    template = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A {bos}:1 $B:1",
        special_tokens=[(bos, tokenizer.token_to_id(bos))],
    )
    return processors.Sequence([byte_level, template])


def _corpus_text() -> str:
    return resources.files("lathe.testing").joinpath("data/tiny_corpus.txt").read_text("utf-8")


def tokenizer_config(
    family_name: str, tokenizer: Tokenizer, model_max_length: int
) -> dict[str, Any]:
    """tokenizer_config.json: added tokens, chat template and the family's loader settings."""
    family = FAMILIES[family_name]
    added = tokenizer.get_added_tokens_decoder()
    config: dict[str, Any] = {
        # transformers rebuilds some tokenizer classes (e.g. Qwen2Tokenizer) from vocab + merges
        # and takes added tokens from here, as real checkpoints ship them.
        "added_tokens_decoder": {str(i): _added_token_json(added[i]) for i in sorted(added)},
        "bos_token": family.bos_token,
        "chat_template": family.chat_template,
        # True (Llama 3's setting) rewrites " ." to "." on decode and breaks round-trips.
        "clean_up_tokenization_spaces": False,
        "eos_token": family.eos_token,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "pad_token": family.pad_token,
        "tokenizer_class": family.tokenizer_class,
    }
    if family.extra_special_tokens:
        config["additional_special_tokens"] = list(family.extra_special_tokens)
    if family_name == "qwen3":
        # Copied from Qwen3's tokenizer_config.json.
        config |= {
            "add_bos_token": False,
            "add_prefix_space": False,
            "errors": "replace",
            "split_special_tokens": False,
            "unk_token": None,
        }
    return config


def _added_token_json(token: AddedToken) -> dict[str, Any]:
    return {
        "content": token.content,
        "lstrip": token.lstrip,
        "normalized": token.normalized,
        "rstrip": token.rstrip,
        "single_word": token.single_word,
        "special": token.special,
    }


def special_tokens_map(family: Family) -> dict[str, Any]:
    """Legacy file that transformers no longer needs but other loaders still read."""
    named = {
        "bos_token": family.bos_token,
        "eos_token": family.eos_token,
        "pad_token": family.pad_token,
    }
    tokens: dict[str, Any] = {key: value for key, value in named.items() if value is not None}
    if family.extra_special_tokens:
        tokens["additional_special_tokens"] = list(family.extra_special_tokens)
    return tokens
