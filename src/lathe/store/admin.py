"""Checkpoint tools for the machine's operator (`lathe checkpoint ...`), on the data dir.

They use the same store queries and checkpoint files as the server, and are safe to run while
it serves (SQLite in WAL mode; checkpoint folders appear by atomic rename). The tools that need
the model and torch (merge, import) are `lathe.engine.offline`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lathe.store import checkpoint_files, tinker_paths
from lathe.store.db import CheckpointRow, Store
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
    store.remove_checkpoint(find(store, path), "admin")
