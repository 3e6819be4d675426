"""The ids the service hands out, `tinker://<model_id>/<kind>/<name>` paths, and the
checkpoint folders behind them: each format is written (and parsed) here only."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path

# path segment -> checkpoint type
KINDS = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")


class PathError(ValueError):
    """A malformed tinker:// path or checkpoint name (the API answers it with a 400)."""


# --- ids: a session's training runs, samplers and custom losses are numbered by the client ----


def new_session_id() -> str:
    return f"sess-{uuid.uuid4().hex[:16]}"


def model_id_for(session_id: str, model_seq_id: int) -> str:
    """A training run's id (the model_id of its requests and the first part of its paths)."""
    return f"{session_id}:train:{model_seq_id}"


def sampler_id_for(session_id: str, sampling_session_seq_id: int) -> str:
    return f"{session_id}:sample:{sampling_session_seq_id}"


def loss_id_for(session_id: str, custom_loss_seq_id: int) -> str:
    return f"{session_id}:loss:{custom_loss_seq_id}"


# --- tinker:// paths -----------------------------------------------------------------------


@dataclass(frozen=True)
class TinkerPath:
    model_id: str
    kind: str  # weights | sampler_weights
    name: str

    def __str__(self) -> str:
        return format_path(self.model_id, self.kind, self.name)


def format_path(model_id: str, kind: str, name: str) -> str:
    return f"tinker://{model_id}/{kind}/{name}"


def parse(path: str) -> TinkerPath:
    usage = f"invalid path {path!r}: expected tinker://<model_id>/<kind>/<name>"
    if not path.startswith("tinker://"):
        raise PathError(usage)
    parts = path[len("tinker://") :].split("/")
    if len(parts) != 3 or not all(parts):
        raise PathError(usage)
    model_id, kind, name = parts
    if kind not in KINDS:
        raise PathError(f"invalid path {path!r}: kind must be one of {', '.join(KINDS)}")
    return TinkerPath(model_id, kind, name)


def check_name(name: str) -> str:
    if not NAME_RE.match(name) or ".." in name:
        raise PathError(
            f"invalid checkpoint name {name!r}: use 1-128 letters, digits, '_', '-' or '.', "
            "not starting with '.' or '-'"
        )
    return name


def checkpoint_dir(root: Path, model_id: str, kind: str, name: str) -> Path:
    return root / model_id / kind / name
