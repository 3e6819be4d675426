"""The server's one settings object, built by the CLI (or by tests) and passed down."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_data_dir() -> Path:
    return Path(os.environ.get("LATHE_HOME", "~/.lathe")).expanduser()


@dataclass(frozen=True)
class Settings:
    models: dict[str, Path]  # base model name clients use -> local Hugging Face folder
    data_dir: Path = field(default_factory=default_data_dir)  # DB and checkpoints live here
    host: str = "127.0.0.1"  # address to bind
    port: int = 8000  # port to bind
    dtype: str = "float32"  # base model weights: float32 | bfloat16 | float16
    device: str = "cpu"  # torch device of the engine, e.g. "cuda:0"
    max_lora_rank: int = 128  # largest LoRA rank a client may ask for
    long_poll_seconds: float = 30.0  # how long retrieve_future holds a pending request
    default_max_tokens: int = 256  # sampling length when the client sends max_tokens=null
    threads: int | None = None  # torch intra-op threads of the engine; None = torch's default
    microbatch_tokens: int = 16384  # padded tokens per training micro-batch (bounds memory)
    kv_cache_tokens: int = 65536  # KV positions sampled sequences may hold, per base model
    max_pending_samples: int = 4096  # queued + running sample requests before /asample says 429
    client_config: dict[str, Any] = field(default_factory=dict)  # overrides of /client/config

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("at least one base model is needed")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.max_lora_rank < 1:
            raise ValueError("max_lora_rank must be at least 1")
        if not 0 < self.long_poll_seconds < 45:
            raise ValueError("long_poll_seconds must be in (0, 45): the SDK times out at 45 s")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def db_path(self) -> Path:
        return self.data_dir / "lathe.db"

    @property
    def checkpoint_dir(self) -> Path:
        return self.data_dir / "checkpoints"
