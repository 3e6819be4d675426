"""The on-disk checkpoint format: a PEFT adapter folder, plus optimizer state when training.

    adapter_config.json          PEFT LoRA config (rank, alpha, target modules, base model)
    adapter_model.safetensors    PEFT key names: base_model.model.<module>.lora_A.weight, ...
    optimizer.safetensors        training checkpoints only: AdamW moments and step per tensor
    lathe.json                   what lathe needs to restore it (LoRA config, base model, ...)

A checkpoint is written into a temporary sibling folder and renamed into place, so a reader
(or a crash) never sees half of one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lathe.engine.lora import Adapter
from lathe.faults import fault
from lathe.protocol.messages import LoraConfig
from lathe.store.atomic import fsync_file, replace_dir

FORMAT_VERSION = 1
PEFT_PREFIX = "base_model.model."


def peft_key(module_name: str, kind: str) -> str:
    return f"{PEFT_PREFIX}{module_name}.{kind}.weight"


def adapter_config_json(adapter: Adapter, base_model: str) -> dict[str, Any]:
    targets = sorted({name.rsplit(".", 1)[-1] for name in adapter.a})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": adapter.config.rank,
        "lora_alpha": adapter.config.alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        "modules_to_save": None,
    }


def write_checkpoint(
    directory: Path,
    adapter: Adapter,
    base_model: str,
    metadata: dict[str, Any],
    optimizer_state: dict[str, torch.Tensor] | None = None,
) -> int:
    """Write atomically; replace an existing checkpoint of the same name. Returns total bytes."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        if fault("save_error") == "ENOSPC":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        tensors = {
            peft_key(name, kind): t.detach().to("cpu", torch.float32).contiguous()
            for name, kind, t in adapter.named_tensors()
        }
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "adapter_config.json", adapter_config_json(adapter, base_model))
        if optimizer_state is not None:
            save_file(optimizer_state, str(tmp / "optimizer.safetensors"))
        files = {f.name: file_record(f) for f in sorted(tmp.iterdir())}
        meta = {
            "format_version": FORMAT_VERSION,
            "files": files,  # sizes and sha256 of everything but this file
            "base_model": base_model,
            "lora": asdict(adapter.config),
            "has_optimizer": optimizer_state is not None,
            "modules": list(adapter.a),  # module order, which the optimizer's order follows
            **metadata,
        }
        write_json(tmp / "lathe.json", meta)
        for f in tmp.iterdir():
            fsync_file(f)
        size = sum(f.stat().st_size for f in tmp.iterdir())
        if delay := fault("save_delay"):
            time.sleep(float(delay))
        replace_dir(tmp, directory)
        return size
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_complete(directory: Path) -> bool:
    """The files every checkpoint has are present (lathe.json is written last)."""
    return all((directory / f).is_file() for f in ("lathe.json", "adapter_model.safetensors"))


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


PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def files_of(directory: Path) -> list[str]:
    """What a download or an export holds: the PEFT adapter files."""
    return [f for f in PEFT_FILES if (directory / f).is_file()]


def read_metadata(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "lathe.json").read_text())


def read_adapter(directory: Path, device: torch.device | str = "cpu") -> Adapter:
    """The adapter stored in a checkpoint folder, as fresh fp32 leaf tensors."""
    meta = read_metadata(directory)
    config = LoraConfig(**meta["lora"])
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    adapter = Adapter(config)
    for name in meta["modules"]:
        adapter.a[name] = tensors[peft_key(name, "lora_A")].to(device).requires_grad_(True)
        adapter.b[name] = tensors[peft_key(name, "lora_B")].to(device).requires_grad_(True)
    return adapter


def read_optimizer_state(directory: Path) -> dict[str, torch.Tensor] | None:
    path = directory / "optimizer.safetensors"
    return load_file(str(path)) if path.exists() else None


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
