"""What a `model` string names: a served base model, a checkpoint, or both.

Accepted, as Tinker's OpenAI-compatible endpoint documents: a base model name
(`Qwen/Qwen3-8B`), a `tinker://…/sampler_weights/…` (or training `…/weights/…`) path, or
`"<base>;<tinker path>"`. Checkpoints are looked up through the caller, so another user's
private checkpoint is "not found" exactly like one that does not exist; published ones are
readable by all.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import HTTPException

from lathe.api.deps import Caller
from lathe.store import checkpoint_files
from lathe.store.catalog import BaseModelInfo
from lathe.store.tinker_paths import PathError


@dataclass(frozen=True)
class Target:
    model: str  # as the client named it; responses echo it
    info: BaseModelInfo  # the base model
    directory: Path | None  # the checkpoint folder with the adapter; None = the base model
    checkpoint_id: int | None  # the checkpoint's row: a path saved again is a new adapter

    def sampler_key(self) -> str:
        """Names the engine sampler of these weights (the same for every caller)."""
        ident = f"{self.info.name}\0{self.directory}\0{self.checkpoint_id}"
        return hashlib.sha256(ident.encode()).hexdigest()[:24]


class ModelNotFound(HTTPException):
    def __init__(self, model: str) -> None:
        super().__init__(
            404, f"The model `{model}` does not exist or you do not have access to it."
        )


def resolve(caller: Caller, model: str) -> Target:
    """The base model and adapter `model` names; ModelNotFound (404) otherwise."""
    catalog = caller.state.catalog
    base_name, sep, path = model.partition(";")
    if not sep:
        base_name, path = ("", model) if model.startswith("tinker://") else (model, "")
    if base_name and base_name not in catalog:
        raise ModelNotFound(model)
    if not path:
        return Target(model, catalog[base_name], None, None)
    try:
        ckpt = caller.checkpoint(path)
    except (HTTPException, PathError):
        raise ModelNotFound(model) from None
    trained_on = checkpoint_files.read_metadata(ckpt.directory_path)["base_model"]
    if base_name and trained_on != base_name:
        raise HTTPException(400, f"{path} was trained on {trained_on!r}, not {base_name!r}")
    if trained_on not in catalog:
        raise HTTPException(400, f"{path} was trained on {trained_on!r}, which is not served")
    return Target(model, catalog[trained_on], ckpt.directory_path, ckpt.id)
