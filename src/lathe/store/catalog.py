"""What the API knows about each served base model, read from config.json (no weights).

Here rather than in lathe.models so the API reads it without torch; `lathe.models.loading`
checks at import that its family files are exactly `SUPPORTED_FAMILIES`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# model_type values in config.json that lathe has a family file for (lathe.models.loading).
SUPPORTED_FAMILIES: tuple[str, ...] = ("qwen3", "llama")


@dataclass(frozen=True)
class BaseModelInfo:
    name: str  # the name clients pass as base_model
    path: Path  # local folder; also the tokenizer id clients load with AutoTokenizer
    family: str  # model_type
    arch: str  # architectures[0], e.g. Qwen3ForCausalLM
    vocab_size: int  # token ids must be below this
    max_context: int  # longest sequence accepted


def read_hf_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a model folder: no config.json")
    config: dict[str, Any] = json.loads(cfg_file.read_text())
    return config


def read_info(name: str, path: Path) -> BaseModelInfo:
    path = Path(path).resolve()
    cfg = read_hf_config(path)
    family = cfg.get("model_type", "")
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"{path}: model_type {family!r} is not supported")
    return BaseModelInfo(
        name=name,
        path=path,
        family=family,
        arch=(cfg.get("architectures") or [family])[0],
        vocab_size=int(cfg["vocab_size"]),
        max_context=int(cfg.get("max_position_embeddings", 2048)),
    )
