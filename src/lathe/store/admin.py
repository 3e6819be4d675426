"""Checkpoint tools for the machine's operator (`lathe checkpoint ...`), on the data dir.

They use the same store queries, checkpoint files and PEFT code as the server, and are safe
to run while it serves (SQLite in WAL mode; checkpoint folders appear by atomic rename).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from lathe.store import checkpoint_files, tinker_paths
from lathe.store.db import CheckpointRow, SessionRow, Store, TrainingRunRow, utcnow
from lathe.store.keys import KeyStore


class AdminError(Exception):
    """Shown to the operator as `lathe: <message>`."""


def find(store: Store, path: str) -> CheckpointRow:
    tp = tinker_paths.parse(path)
    row = store.find_checkpoint(tp.model_id, tp.kind, tp.name)
    if row is None:
        raise AdminError(f"checkpoint {path} not found")
    return row


def listing(store: Store, keys: KeyStore, user: str | None, run: str | None) -> list[CheckpointRow]:
    if run is not None:
        return store.checkpoints_of(run)
    owner = keys.user(user) if user else None
    if user and owner is None:
        raise AdminError(f"no user {user!r}")
    if owner is not None:
        return store.checkpoints_of_user(owner.user_id, 10**9, 0)[0]
    return store.all_checkpoints()


def info(store: Store, path: str) -> dict[str, Any]:
    row = find(store, path)
    meta = checkpoint_files.read_metadata(row.directory_path)
    return {
        "tinker_path": row.tinker_path,
        "created_at": row.created_at.isoformat(),
        "size_bytes": row.size_bytes,
        "public": row.public,
        "expires_at": row.expires_at.isoformat() if row.expires_at else None,
        "base_model": meta["base_model"],
        "lora": meta["lora"],
        "has_optimizer": meta.get("has_optimizer", False),
        "damaged_files": checkpoint_files.verify(row.directory_path),
        "directory": str(row.directory_path),
    }


def download(store: Store, path: str, out_dir: Path) -> Path:
    """The checkpoint's PEFT adapter files, copied into out_dir."""
    row = find(store, path)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in checkpoint_files.files_of(row.directory_path):
        shutil.copy2(row.directory_path / name, out_dir / name)
    return out_dir


def delete(store: Store, path: str) -> None:
    store.remove_checkpoint(find(store, path))


def merge(store: Store, path: str, out_dir: Path, base_dir: Path | None) -> Path:
    from lathe.store.merge import merge_checkpoint

    row = find(store, path)
    meta = checkpoint_files.read_metadata(row.directory_path)
    base = base_dir or (Path(meta["base_model_path"]) if meta.get("base_model_path") else None)
    if base is None or not (base / "config.json").is_file():
        raise AdminError(f"where is base model {meta['base_model']!r}? pass --base-dir PATH")
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
    from lathe.engine.runner import load_base_model
    from lathe.store.peft_io import read_peft_adapter

    owner = keys.user(user, create=True)
    assert owner is not None
    tinker_paths.check_name(name)
    base = load_base_model(base_name, base_dir, torch.float32, "cpu")
    try:
        adapter, _ = read_peft_adapter(peft_dir, base.module)
    except ValueError as e:
        raise AdminError(f"cannot import {peft_dir}: {e}") from None
    session_id = tinker_paths.new_session_id()
    model_id = tinker_paths.model_id_for(session_id, 0)
    store.add(
        SessionRow(
            session_id=session_id,
            owner_id=owner.user_id,
            finished_at=utcnow(),
            user_metadata={"imported_from": str(peft_dir)},
        )
    )
    store.add(
        TrainingRunRow.of_adapter(model_id, owner.user_id, session_id, base_name, adapter.config)
    )
    directory = tinker_paths.checkpoint_dir(checkpoint_root, model_id, "weights", name)
    metadata = {
        "model_id": model_id,
        "name": name,
        "imported_from": str(peft_dir),
        "base_model_path": str(Path(base_dir).resolve()),
    }
    size = checkpoint_files.write_checkpoint(directory, adapter, base_name, metadata)
    store.upsert_checkpoint(model_id, owner.user_id, "weights", name, str(directory), size)
    return str(tinker_paths.TinkerPath(model_id, "weights", name))
