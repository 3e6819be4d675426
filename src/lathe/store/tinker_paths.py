"""`tinker://<model_id>/<kind>/<name>` paths and the checkpoint folders behind them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# path segment -> checkpoint type
KINDS = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")


class PathError(ValueError):
    """A malformed tinker:// path or checkpoint name (the API answers it with a 400)."""


@dataclass(frozen=True)
class TinkerPath:
    model_id: str
    kind: str  # weights | sampler_weights
    name: str

    def __str__(self) -> str:
        return f"tinker://{self.model_id}/{self.kind}/{self.name}"


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
