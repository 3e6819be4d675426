"""Load a local Hugging Face model folder into one of our model implementations.

A folder holds `config.json`, `*.safetensors` (one file or shards with an index) and the
tokenizer files. `config.json`'s `model_type` picks the family file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from lathe.models import llama, qwen3
from lathe.store.catalog import SUPPORTED_FAMILIES, read_hf_config

# model_type in config.json -> the family's file, which defines Config, CausalLM, rope_inv_freq.
FAMILIES: dict[str, ModuleType] = {"qwen3": qwen3, "llama": llama}
if set(FAMILIES) != set(SUPPORTED_FAMILIES):  # the API's torch-free list must say the same
    raise RuntimeError(f"catalog.SUPPORTED_FAMILIES {SUPPORTED_FAMILIES} != {sorted(FAMILIES)}")


@dataclass(frozen=True)
class LoadedModel:
    """A base model ready to serve, with what the API needs to describe it."""

    module: nn.Module  # the causal LM, frozen (requires_grad False), in eval mode
    family: str  # model_type from config.json
    config: Any  # the family's config dataclass
    hf_config: dict[str, Any]  # config.json as read
    path: Path  # the folder it came from (also the tokenizer id clients load)


def load_state_dict(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files, read straight onto `device` (a GPU's
    weights never pass through host memory whole)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f), device=str(device)))
    return state


def load_model(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> LoadedModel:
    """Build the family's module from config.json and load the weights (strictly)."""
    path = Path(path).resolve()
    hf_config = read_hf_config(path)
    family = hf_config.get("model_type", "")
    if family not in FAMILIES:
        raise ValueError(
            f"{path}: model_type {family!r} is not supported (supported: {', '.join(FAMILIES)})"
        )
    return build_model(hf_config, load_state_dict(path, device), dtype, device, path)


def build_model(
    hf_config: dict[str, Any],
    state: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: str,
    path: Path,
) -> LoadedModel:
    """The family's module for `hf_config` (a config.json's contents) holding the tensors of
    `state` (assigned, not copied, where device and dtype already match), frozen."""
    family = hf_config["model_type"]
    fam = FAMILIES[family]
    config = fam.Config.from_hf(hf_config)
    with torch.device("meta"):
        module = fam.CausalLM(config)
    state = dict(state)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # some tied checkpoints store a copy anyway
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        module.lm_head.weight = module.model.embed_tokens.weight
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match the config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    # Buffers built on the meta device (RoPE frequencies) are recomputed for real.
    module.inv_freq = fam.rope_inv_freq(config)
    module = module.to(device=device, dtype=dtype)
    module.inv_freq = module.inv_freq.float()  # keep RoPE frequencies in fp32
    module.eval().requires_grad_(False)
    return LoadedModel(module=module, family=family, config=config, hf_config=hf_config, path=path)
