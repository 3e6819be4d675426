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
class Limits:
    """What one request or one user may ask for; exceeding one is a 4xx naming it."""

    max_body_bytes: int = 64 * 2**20  # size of any request body (after decompression too)
    max_datums_per_request: int = 4096  # datums in one forward/forward_backward request
    max_tokens_per_request: int = 1 << 20  # model_input tokens in one such request
    max_num_samples: int = 128  # num_samples of one sampling request
    max_sample_tokens: int = 8192  # max_tokens of one sampling request
    max_training_runs: int = 64  # training runs per user in sessions not yet finished
    max_queued_requests: int = 1024  # unfinished requests per user (then 429 + retry-after)
    max_checkpoint_bytes: int = 100 * 2**30  # checkpoint storage per user

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 1:
                raise ValueError(f"limit {name} must be at least 1")


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
    reap_seconds: float = 60.0  # how often expired checkpoints are deleted
    deterministic: bool = False  # batch-invariant training: bitwise the same when co-batched
    max_resident_adapters: int = 256  # training adapters kept in memory; idle ones swap to disk
    session_timeout_seconds: float = 600.0  # a session with no heartbeat for this long ends
    dev: bool = False  # local mode: any tml- key is one local user (loopback only)
    jwt: bool = False  # issue short-lived JWTs at /auth/token (SDK whoami, credential commands)
    limits: Limits = field(default_factory=Limits)

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
    def swap_dir(self) -> Path:
        return self.data_dir / "swap"

    @property
    def checkpoint_dir(self) -> Path:
        return self.data_dir / "checkpoints"
