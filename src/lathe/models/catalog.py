"""What the API knows about each served base model, read from config.json (no weights)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lathe.models.loading import FAMILIES, read_hf_config


@dataclass(frozen=True)
class BaseModelInfo:
    name: str  # the name clients pass as base_model
    path: Path  # local folder; also the tokenizer id clients load with AutoTokenizer
    family: str  # model_type
    arch: str  # architectures[0], e.g. Qwen3ForCausalLM
    vocab_size: int  # token ids must be below this
    max_context: int  # longest sequence accepted


def read_info(name: str, path: Path) -> BaseModelInfo:
    path = Path(path).resolve()
    cfg = read_hf_config(path)
    family = cfg.get("model_type", "")
    if family not in FAMILIES:
        raise ValueError(f"{path}: model_type {family!r} is not supported")
    return BaseModelInfo(
        name=name,
        path=path,
        family=family,
        arch=(cfg.get("architectures") or [family])[0],
        vocab_size=int(cfg["vocab_size"]),
        max_context=int(cfg.get("max_position_embeddings", 2048)),
    )
