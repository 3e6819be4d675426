"""The server's one settings object, built by the CLI (or by tests) and passed down.

Every field is a `lathe serve` flag: cli.py makes the flags from these fields (the name in
--kebab-case unless `flag` says otherwise, the type from the annotation, the doc as the help).
No torch here, so the CLI starts fast; the engine turns `dtype` into a torch dtype.
"""

from __future__ import annotations

import os
import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

# torch dtypes base weights may be loaded in; auto: float32 on a CPU, bfloat16 on a GPU
DTYPES = ("auto", "float32", "bfloat16", "float16")
ENGINE_MODES = ("process", "thread")  # where the engine runs, or a shared engine's tcp:// address
SHARED_ENGINE = re.compile(r"tcp://[^\s/:]+:\d{1,5}")  # `lathe engine --listen` address
COMPILE_MODES = ("auto", "on", "off")  # torch.compile of the decoder's elementwise parts
# What torchrun sets for each rank it starts (`lathe engine` under torchrun joins its group).
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def default_data_dir() -> Path:
    return Path(os.environ.get("LATHE_HOME", "~/.lathe")).expanduser()


def option(
    default: Any,
    doc: str,
    *,
    factory: Any = MISSING,
    flag: str | None = None,
    metavar: str | None = None,
    choices: tuple[str, ...] | None = None,
    engine: bool = False,
) -> Any:
    """A field with its one-line doc, which is also its `lathe serve --help` text.

    flag: the CLI flag where it is not `--` + the name in kebab-case.
    engine: the engine is built from it (engine_spec), so `lathe engine` takes it too.
    """
    metadata = {"doc": doc, "flag": flag, "metavar": metavar, "choices": choices, "engine": engine}
    return field(default=default, default_factory=factory, metadata=metadata)


@dataclass(frozen=True)
class Limits:
    """What one request or one user may ask for; exceeding one is a 4xx naming it."""

    max_body_bytes: int = option(64 * 2**20, "size of any request body (after decompression too)")
    max_datums_per_request: int = option(4096, "datums in one forward/forward_backward request")
    max_tokens_per_request: int = option(1 << 20, "model_input tokens in one such request")
    max_num_samples: int = option(128, "num_samples of one sampling request")
    max_sample_tokens: int = option(8192, "max_tokens of one sampling request")
    max_training_runs: int = option(64, "training runs per user in sessions not yet finished")
    max_queued_requests: int = option(1024, "unfinished requests per user (then 429 + retry-after)")
    max_checkpoint_bytes: int = option(100 * 2**30, "checkpoint storage per user")

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"limit {f.name} must be at least 1")


@dataclass(frozen=True)
class Settings:
    models: dict[str, Path] = option(
        MISSING,
        "serve the Hugging Face folder PATH as base model NAME, the name clients use "
        "(repeatable); default: a built-in tiny model",
        flag="--model",
        metavar="NAME=PATH",
        engine=True,
    )
    data_dir: Path = option(
        MISSING,
        "database and checkpoints live here ($LATHE_HOME, else ~/.lathe)",
        factory=default_data_dir,
        engine=True,
    )
    database_url: str | None = option(
        None,
        "metadata database shared by API replicas, postgresql+psycopg://USER:PASSWORD@HOST/NAME "
        "(migrated on start); default: SQLite in the data dir",
        metavar="URL",
    )
    host: str = option("127.0.0.1", "address to bind")
    port: int = option(8000, "port to bind")
    dtype: str = option(
        "auto",
        "base model weights' dtype (LoRA weights, gradients and optimizer state are always "
        "float32); auto: float32 on a CPU, bfloat16 on a GPU",
        choices=DTYPES,
        engine=True,
    )
    device: str = option(
        "cpu", 'torch device of the engine: "cpu", "cuda" or "cuda:N"', engine=True
    )
    engine: str = option(
        "process",
        "where the engine runs: in a process of its own (the API never loads torch), on a "
        "thread of the API process, or tcp://HOST:PORT: the engine service `lathe engine "
        "--listen` runs there, shared by several API replicas (same --data-dir and "
        "--database-url)",
        metavar="{process,thread,tcp://HOST:PORT}",
    )
    ranks: int = option(
        1,
        "engine processes of one torch.distributed group on this machine (gloo on CPUs; NCCL "
        "on GPUs, rank r on cuda:r): the base models' weights are sharded across them (FSDP2)",
        engine=True,
    )
    max_lora_rank: int = option(128, "largest LoRA rank a client may ask for")
    long_poll_seconds: float = option(
        30.0, "how long retrieve_future holds a pending request (under the SDK's 45 s)"
    )
    default_max_tokens: int = option(256, "sampling length when the client sends max_tokens=null")
    threads: int | None = option(
        None, "torch intra-op threads of the engine (default: torch's)", engine=True
    )
    microbatch_tokens: int = option(
        16384,
        "tokens per training micro-batch, packed without padding (bounds memory); work of "
        "several adapters is co-batched up to it",
        engine=True,
    )
    checkpoint_activations_above: int = option(
        8192,
        "micro-batches of more tokens keep one decoder layer's activations at a time and "
        "recompute the rest in the backward pass (long contexts fit; about 1/3 more compute); "
        "0: always",
        metavar="TOKENS",
        engine=True,
    )
    kv_cache_tokens: int = option(
        65536,
        "KV positions sampled sequences may hold, per base model; requests wait beyond it",
        engine=True,
    )
    max_pending_samples: int = option(
        4096, "sample requests queued or running before /asample answers 429"
    )
    client_config: dict[str, Any] = option(
        MISSING,
        "overrides of what /client/config tells the SDK, e.g. '{\"fwdbwd_max_chunk_len\": 8}'",
        factory=dict,
        metavar="JSON",
    )
    reap_seconds: float = option(60.0, "how often checkpoints past their TTL are deleted")
    deterministic: bool = option(
        False,
        "batch-invariant training: a tenant's results are bitwise the same alone or co-batched "
        "(slower)",
        engine=True,
    )
    compile: str = option(
        "auto",
        "torch.compile the decoder's RMSNorm, RoPE and SwiGLU into fused kernels (training and "
        "sampling); auto: on CUDA devices only, where it pays",
        choices=COMPILE_MODES,
        engine=True,
    )
    max_resident_adapters: int = option(
        256,
        "training adapters kept in memory; idle ones are swapped to disk",
        engine=True,
    )
    session_timeout_seconds: float = option(
        600.0,
        "seconds without a heartbeat after which a session ends (its checkpoints stay)",
        flag="--session-timeout",
    )
    dev: bool = option(
        False, "local mode: any tml- key is accepted as one local user (loopback only)"
    )
    jwt: bool = option(
        False, "issue short-lived JWTs at /auth/token (the SDK's whoami, credential commands)"
    )
    log_level: str = option("warning", "uvicorn's log level", choices=LOG_LEVELS)
    limits: Limits = option(
        MISSING,
        "override one per-request or per-user limit (repeatable; the limits are listed below)",
        factory=Limits,
        flag="--limit",
        metavar="NAME=N",
    )

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("at least one base model is needed")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be cpu, cuda or cuda:N, not {self.device!r}")
        if self.database_url is not None and not self.database_url.startswith(
            ("sqlite", "postgresql")
        ):
            raise ValueError("database_url must be a sqlite:// or postgresql+psycopg:// URL")
        if self.engine not in ENGINE_MODES and not self.shared_engine:
            raise ValueError(
                f"engine must be one of {', '.join(ENGINE_MODES)} or tcp://HOST:PORT, "
                f"not {self.engine!r}"
            )
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        if self.microbatch_tokens < 1:
            raise ValueError("microbatch_tokens must be at least 1")
        if self.checkpoint_activations_above < 0:
            raise ValueError("checkpoint_activations_above must be at least 0")
        if self.ranks < 1:
            raise ValueError("ranks must be at least 1")
        if self.max_lora_rank < 1:
            raise ValueError("max_lora_rank must be at least 1")
        if not 0 < self.long_poll_seconds < 45:
            raise ValueError("long_poll_seconds must be in (0, 45): the SDK times out at 45 s")

    @property
    def sdk_client_config(self) -> dict[str, Any]:
        """What these settings add to /client/config: JWT mode, then the --client-config
        overrides (the server's fixed features are in api/routers/service.py)."""
        return {**({"pjwt_auth_enabled": True} if self.jwt else {}), **self.client_config}

    @property
    def shared_engine(self) -> bool:
        """The engine is a service of its own (`lathe engine`), at the address `engine`."""
        return SHARED_ENGINE.fullmatch(self.engine) is not None

    @property
    def db_path(self) -> Path:
        return self.data_dir / "lathe.db"

    @property
    def swap_dir(self) -> Path:
        return self.data_dir / "swap"

    @property
    def checkpoint_dir(self) -> Path:
        return self.data_dir / "checkpoints"
