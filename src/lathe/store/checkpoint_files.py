"""The on-disk checkpoint format: a PEFT adapter folder, plus optimizer state when training.

    adapter_config.json          PEFT LoRA config (rank, alpha, target modules, base model)
    adapter_model.safetensors    PEFT key names: base_model.model.<module>.lora_A.weight, ...
    optimizer.safetensors        training checkpoints only: AdamW moments and step per tensor
    lathe.json                   what lathe needs to restore it (LoRA config, base model, ...)

A checkpoint is written into a temporary sibling folder and renamed into place, so a reader
(or a crash) never sees half of one.

Scope: the folder layout, lathe.json and the atomic write, without torch, so the API and the
operator tools read checkpoints without loading it. The tensor files are written and read by
`lathe.engine.checkpoint_io`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

# The atomic write lives in store/atomic.py; re-exported for the checkpoint writers.
from lathe.store.atomic import atomic_dir, fsync_all, fsync_file, replace_dir  # noqa: F401

FORMAT_VERSION = 1
METADATA_FILE = "lathe.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
OPTIMIZER_FILE = "optimizer.safetensors"


def write_metadata(folder: Path, base_model: str, extra: dict[str, Any]) -> None:
    """Write lathe.json (last), recording the size and sha256 of every other file in `folder`.

    `extra` holds what the writer knows (LoRA config, module order, has_optimizer, ...)."""
    files = {f.name: file_record(f) for f in sorted(folder.iterdir())}
    meta = {
        "format_version": FORMAT_VERSION,
        "files": files,  # sizes and sha256 of everything but this file
        "base_model": base_model,
        **extra,
    }
    write_json(folder / METADATA_FILE, meta)


def is_complete(directory: Path) -> bool:
    """The files every checkpoint has are present (lathe.json is written last)."""
    return all((directory / f).is_file() for f in (METADATA_FILE, ADAPTER_WEIGHTS_FILE))


def file_record(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def verify(directory: Path) -> list[str]:
    """Files that are missing or differ from the sizes and checksums the checkpoint recorded."""
    recorded = read_metadata(directory).get("files", {})
    return [
        name
        for name, rec in recorded.items()
        if not (directory / name).is_file() or file_record(directory / name) != rec
    ]


def sweep_unfinished(root: Path) -> int:
    """Remove temporary folders a crash left behind mid-save; returns how many."""
    if not root.exists():
        return 0
    leftovers = [p for p in root.glob("*/*/.*") if ".tmp-" in p.name or ".old-" in p.name]
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)
    return len(leftovers)


PEFT_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)


def files_of(directory: Path) -> list[str]:
    """What a download or an export holds: the PEFT adapter files."""
    return [f for f in PEFT_FILES if (directory / f).is_file()]


def read_metadata(directory: Path) -> dict[str, Any]:
    return json.loads((directory / METADATA_FILE).read_text())


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
