"""The tensors of a checkpoint folder: the PEFT adapter and the optimizer state.

The folder layout, lathe.json and the atomic write are `lathe.store.checkpoint_files` (no
torch); this file fills a folder with safetensors and reads them back as an `Adapter`.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lathe.faults import crash_point, fault
from lathe.models.lora import Adapter
from lathe.protocol.messages import LoraConfig
from lathe.store import checkpoint_files
from lathe.store.checkpoint_files import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, OPTIMIZER_FILE

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
    with checkpoint_files.atomic_dir(directory) as tmp:
        if fault("save_error") == "ENOSPC":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        tensors = {
            peft_key(name, kind): t.detach().to("cpu", torch.float32).contiguous()
            for name, kind, t in adapter.named_tensors()
        }
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
        checkpoint_files.write_json(
            tmp / ADAPTER_CONFIG_FILE, adapter_config_json(adapter, base_model)
        )
        if optimizer_state is not None:
            save_file(optimizer_state, str(tmp / OPTIMIZER_FILE))
        extra = {
            "lora": asdict(adapter.config),
            "has_optimizer": optimizer_state is not None,
            "modules": list(adapter.a),  # module order, which the optimizer's order follows
            **metadata,
        }
        checkpoint_files.write_metadata(tmp, base_model, extra)
        size = sum(f.stat().st_size for f in tmp.iterdir())  # atomic_dir flushes them
        if delay := fault("save_delay"):
            time.sleep(float(delay))
        crash_point("save")  # written, not yet renamed into place
    return size


class CorruptCheckpoint(ValueError):
    """A checkpoint's files differ from the sizes and sha256 recorded when it was saved."""


def read_adapter(directory: Path, device: torch.device | str = "cpu") -> Adapter:
    """The adapter stored in a checkpoint folder, as fresh fp32 leaf tensors, once every
    file of the checkpoint (optimizer state included) matches its recorded sha256."""
    if damaged := checkpoint_files.verify(directory):
        raise CorruptCheckpoint(
            f"checkpoint {directory.parent.name}/{directory.name} is damaged: "
            f"{', '.join(damaged)} no longer match the sha256 recorded when it was saved; "
            "it cannot be loaded"
        )
    meta = checkpoint_files.read_metadata(directory)
    config = LoraConfig(**meta["lora"])
    tensors = load_file(str(directory / ADAPTER_WEIGHTS_FILE))
    adapter = Adapter(config)
    for name in meta["modules"]:
        adapter.a[name] = tensors[peft_key(name, "lora_A")].to(device).requires_grad_(True)
        adapter.b[name] = tensors[peft_key(name, "lora_B")].to(device).requires_grad_(True)
    return adapter


def read_optimizer_state(directory: Path) -> dict[str, torch.Tensor] | None:
    path = directory / OPTIMIZER_FILE
    return load_file(str(path)) if path.exists() else None
