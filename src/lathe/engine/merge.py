"""Merge a LoRA checkpoint into its base model: a plain Hugging Face model folder.

`merge_checkpoint(base_dir, checkpoint_dir, out_dir)` writes, at `out_dir`, the base folder's
weights with the adapter folded in, W' = W + alpha/r * (B @ A) for every adapted module
(computed in fp32, stored in the base's dtype), so `transformers` (or any other loader) runs
the fine-tuned model without PEFT or lathe.

Scope:
* The adapter is a lathe checkpoint (read with `checkpoint_io.read_adapter`) or any PEFT
  LoRA folder lathe can represent (read with `peft_io.read_peft_adapter` against the base).
* Weights come from the base folder's `*.safetensors` files (one file or shards with an
  index); every output file keeps the base file's name, key names and metadata. Other top-level
  files (config, generation config, tokenizer, chat template, license, ...) are copied; other
  weight formats and subfolders (e.g. Llama's `original/`) are not, since they would hold the
  unmerged weights.
* Tied embeddings with an adapted lm_head: the delta belongs to the unembedding only, so an
  explicit `lm_head.weight` (embedding + delta) is written and the copied config.json says
  `tie_word_embeddings: false`; the input embedding is left as it was. (PEFT's own
  `merge_and_unload` would instead add the delta to the shared matrix, changing the input
  embedding too.)
* The output appears atomically: it is assembled in a temporary folder beside `out_dir` and
  renamed into place. An existing, non-empty `out_dir` is refused.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lathe.engine import checkpoint_io
from lathe.engine.peft_io import read_peft_adapter
from lathe.models.loading import load_model, read_hf_config
from lathe.models.lora import UNEMBED_TARGET, Adapter, apply_lora
from lathe.store import checkpoint_files
from lathe.store.atomic import atomic_dir

EMBED_KEY = "model.embed_tokens.weight"
LM_HEAD_KEY = f"{UNEMBED_TARGET}.weight"
INDEX_FILE = "model.safetensors.index.json"
# Weight files of other formats are not copied: they would hold the unmerged weights.
SKIPPED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


@dataclass(frozen=True)
class MergePlan:
    """Which file holds each key, and how lm_head is handled."""

    files: dict[str, list[str]]  # weight file name -> its keys
    untie: bool  # write an explicit lm_head.weight and set tie_word_embeddings false
    lm_head_file: str | None  # the file that receives lm_head.weight when untying


def merge_checkpoint(base_dir: Path, checkpoint_dir: Path, out_dir: Path) -> Path:
    """Write base + adapter as a complete Hugging Face model folder at `out_dir`; return it."""
    base_dir, checkpoint_dir, out_dir = Path(base_dir), Path(checkpoint_dir), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not an empty directory")
    hf_config = read_hf_config(base_dir)
    adapter = read_any_adapter(base_dir, checkpoint_dir, hf_config)
    plan = plan_merge(base_dir, adapter, hf_config)
    with atomic_dir(out_dir) as tmp:  # also replaces an empty out_dir
        for file_name in plan.files:
            write_merged_file(base_dir / file_name, tmp / file_name, adapter, plan)
        copy_other_files(base_dir, tmp, plan)
    return out_dir


def read_any_adapter(base_dir: Path, checkpoint_dir: Path, hf_config: dict[str, Any]) -> Adapter:
    """A lathe checkpoint as written, or an outside PEFT folder checked against the base."""
    if (checkpoint_dir / "lathe.json").is_file():
        return checkpoint_io.read_adapter(checkpoint_dir, "cpu")
    # A PEFT folder names no module order or LoraConfig; read_peft_adapter works them out
    # from the model, and checks any base weights the folder carries against the real ones.
    loaded = load_model(base_dir, dtype=config_dtype(hf_config))
    apply_lora(loaded.module)
    adapter, _ = read_peft_adapter(checkpoint_dir, loaded.module, device="cpu")
    return adapter


def config_dtype(hf_config: dict[str, Any]) -> torch.dtype:
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def plan_merge(base_dir: Path, adapter: Adapter, hf_config: dict[str, Any]) -> MergePlan:
    """Check that every adapted module has a base weight before anything is written."""
    weight_files = sorted(p.name for p in base_dir.glob("*.safetensors"))
    if not weight_files:
        raise FileNotFoundError(f"{base_dir} has no *.safetensors weights")
    files = {name: list_keys(base_dir / name) for name in weight_files}
    where = {key: name for name, keys in files.items() for key in keys}
    tied = bool(hf_config.get("tie_word_embeddings", False)) or LM_HEAD_KEY not in where
    untie = UNEMBED_TARGET in adapter.a and tied
    for module in adapter.a:
        key = EMBED_KEY if (untie and module == UNEMBED_TARGET) else f"{module}.weight"
        if key not in where:
            raise ValueError(f"the adapter adapts {module}, but {base_dir} has no {key}")
    return MergePlan(files=files, untie=untie, lm_head_file=where[EMBED_KEY] if untie else None)


def list_keys(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def file_metadata(path: Path) -> dict[str, str] | None:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def write_merged_file(src: Path, dst: Path, adapter: Adapter, plan: MergePlan) -> None:
    """One weight file: same keys (plus lm_head.weight when untying), adapted ones merged."""
    tensors = load_file(str(src))
    if plan.untie:
        # A copy some tied checkpoints carry anyway is not what the model computed with:
        # loaders tie lm_head to the embedding. The merged head is derived from the embedding.
        tensors.pop(LM_HEAD_KEY, None)
    for key in list(tensors):
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and module in adapter.a:
            tensors[key] = merged_weight(tensors[key], adapter, module)
    if plan.untie and src.name == plan.lm_head_file:
        tensors[LM_HEAD_KEY] = merged_weight(tensors[EMBED_KEY], adapter, UNEMBED_TARGET)
    save_file(tensors, str(dst), metadata=file_metadata(src))


def merged_weight(weight: torch.Tensor, adapter: Adapter, module: str) -> torch.Tensor:
    a = adapter.a[module].detach().to("cpu", torch.float32)
    b = adapter.b[module].detach().to("cpu", torch.float32)
    if (b.shape[0], a.shape[1]) != tuple(weight.shape):
        raise ValueError(
            f"adapter shapes for {module} (B {tuple(b.shape)}, A {tuple(a.shape)}) do not fit "
            f"the base weight {tuple(weight.shape)}"
        )
    merged = weight.to(torch.float32) + adapter.config.scale * (b @ a)
    return merged.to(weight.dtype).contiguous()


def copy_other_files(base_dir: Path, out: Path, plan: MergePlan) -> None:
    """Config, tokenizer and other top-level files; config.json and the index as needed."""
    for src in sorted(base_dir.iterdir()):
        if not src.is_file() or src.name.startswith(".") or src.name.endswith(SKIPPED_SUFFIXES):
            continue
        if src.name == "config.json" and plan.untie:
            config = json.loads(src.read_text())
            config["tie_word_embeddings"] = False  # lm_head now has weights of its own
            checkpoint_files.write_json(out / src.name, config)
        elif src.name == INDEX_FILE and plan.untie:
            checkpoint_files.write_json(
                out / src.name, index_with_lm_head(json.loads(src.read_text()), plan)
            )
        else:
            shutil.copy2(src, out / src.name)


def index_with_lm_head(index: dict[str, Any], plan: MergePlan) -> dict[str, Any]:
    assert plan.lm_head_file is not None
    weight_map = dict(index.get("weight_map", {}))
    weight_map[LM_HEAD_KEY] = plan.lm_head_file
    # metadata.total_size is left as it was: loaders only read weight_map.
    return {**index, "weight_map": dict(sorted(weight_map.items()))}
