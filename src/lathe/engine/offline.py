"""Operator checkpoint tools that need the model and torch (`lathe checkpoint merge|import`).

The others (list, info, download, delete) are `lathe.store.admin`, which has no torch; errors
for the operator are its `AdminError`. Safe to run while the server serves, as those are.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lathe.engine import checkpoint_io
from lathe.engine.merge import merge_checkpoint
from lathe.engine.peft_io import read_peft_adapter
from lathe.engine.runner import load_base_model
from lathe.store import admin, checkpoint_files, tinker_paths
from lathe.store.db import Store
from lathe.store.keys import KeyStore


def merge(store: Store, path: str, out_dir: Path, base_dir: Path | None) -> Path:
    row = admin.find(store, path)
    meta = checkpoint_files.read_metadata(row.directory_path)
    base = base_dir or (Path(meta["base_model_path"]) if meta.get("base_model_path") else None)
    if base is None or not (base / "config.json").is_file():
        raise admin.AdminError(f"where is base model {meta['base_model']!r}? pass --base-dir PATH")
    return merge_checkpoint(base, row.directory_path, out_dir)


def import_peft(
    store: Store,
    keys: KeyStore,
    checkpoint_root: Path,
    peft_dir: Path,
    base_name: str,
    base_dir: Path,
    user: str,
    name: str,
) -> str:
    """A training run of `user` holding an outside PEFT LoRA adapter; returns its path.

    The adapter must fit the base model exactly (same targets and shapes); what lathe cannot
    represent is refused. The run starts without optimizer state.
    """
    owner = keys.user(user, create=True)
    assert owner is not None
    tinker_paths.check_name(name)
    base = load_base_model(base_name, base_dir, torch.float32, "cpu")
    try:
        adapter, _ = read_peft_adapter(peft_dir, base.module)
    except ValueError as e:
        raise admin.AdminError(f"cannot import {peft_dir}: {e}") from None
    model_id = store.add_finished_run(
        owner.user_id, base_name, adapter.config, {"imported_from": str(peft_dir)}
    )
    directory = tinker_paths.checkpoint_dir(checkpoint_root, model_id, "weights", name)
    metadata = {
        "model_id": model_id,
        "name": name,
        "imported_from": str(peft_dir),
        "base_model_path": str(Path(base_dir).resolve()),
    }
    size = checkpoint_io.write_checkpoint(directory, adapter, base_name, metadata)
    store.upsert_checkpoint(model_id, owner.user_id, "weights", name, str(directory), size)
    return str(tinker_paths.TinkerPath(model_id, "weights", name))
