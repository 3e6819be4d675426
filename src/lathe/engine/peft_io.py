"""Bring LoRA adapters written by PEFT (or anything that writes its format) into lathe.

`read_peft_adapter` reads a PEFT adapter folder (`adapter_config.json` plus
`adapter_model.safetensors` or `adapter_model.bin`) and returns an `Adapter` for one of our
models, together with the base model the adapter names. Lathe's own checkpoints are PEFT
folders too, so they read back the same way.

Scope: only adapters lathe computes exactly as PEFT does are accepted. That is plain LoRA on
the linear layers lathe wraps (q/k/v/o, gate/up/down, lm_head), one rank and one alpha for all
of them, scale alpha / r, no biases, and whole groups: all attention projections of every layer
or none, all MLP projections of every layer or none (that is all a `LoraConfig` can say).
Everything else (rsLoRA, DoRA, rank/alpha patterns, LoRA on embeddings, modules_to_save,
initialisations that rewrite the base weights, ...) is refused with a `ValueError` that names
the problem, rather than silently computing something else.

Tied embeddings and an adapted lm_head (measured with peft 0.21.2 / transformers 5.24):

* A plain PEFT LoRA on `lm_head` of a tied model wraps lm_head only: the delta is added to the
  logits and the input embedding is untouched. That is exactly what lathe does, so such adapters
  are accepted; PEFT's unmerged forward and ours agree.
* PEFT's `save_pretrained` then also stores the full base matrix as
  `lm_head.base_layer.weight` (its `save_embedding_layers="auto"` counts lm_head as an
  embedding layer). Such copies of base weights are accepted only when they equal this
  model's weights (then they carry no information); otherwise the adapter was trained against
  different base weights and is refused.
* With `ensure_weight_tying=True` PEFT ties the lm_head adapter to a LoRA on `embed_tokens`,
  which lathe cannot represent; such adapters are refused.
* PEFT's own `merge_and_unload` on a tied model merges the lm_head delta into the shared
  matrix and so changes the input embedding too (wrong logits). `lathe.engine.merge` writes an
  explicit, untied lm_head instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from lathe.models.lora import (
    ATTN_TARGETS,
    MLP_TARGETS,
    UNEMBED_TARGET,
    Adapter,
    LoraConfig,
    LoraLinear,
    lora_shapes,
)

PEFT_PREFIX = "base_model.model."
LORA_KINDS = ("lora_A", "lora_B")
LINEAR_TARGETS = ATTN_TARGETS + MLP_TARGETS + (UNEMBED_TARGET,)
# init_lora_weights values that only choose the starting point of training. The others
# (pissa, olora, corda, loftq, lora_ga) rewrite the base weights the adapter was trained
# against, and mica is a LoRA variant with its own forward.
PLAIN_INITS: tuple[object, ...] = (True, False, "gaussian", "eva", "orthogonal")


def _truthy(value: Any) -> bool:
    return bool(value)


# adapter_config.json fields whose non-default values lathe cannot reproduce:
# field -> (is the value a problem?, why).
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "use_rslora": (_truthy, "rsLoRA scales by alpha/sqrt(r); lathe scales by alpha/r"),
    "use_dora": (_truthy, "DoRA adds a magnitude vector that lathe does not have"),
    "rank_pattern": (_truthy, "per-module ranks (rank_pattern); lathe uses one rank"),
    "alpha_pattern": (_truthy, "per-module alphas (alpha_pattern); lathe uses one alpha"),
    "bias": (lambda v: v not in (None, "none"), "trained biases (bias != 'none')"),
    "lora_bias": (_truthy, "a bias on lora_B (lora_bias)"),
    "modules_to_save": (_truthy, "fully trained modules (modules_to_save)"),
    "fan_in_fan_out": (_truthy, "fan_in_fan_out (Conv1D-style transposed weights)"),
    "layer_replication": (_truthy, "layer_replication (a different layer stack)"),
    "trainable_token_indices": (_truthy, "trainable token embeddings"),
    "target_parameters": (_truthy, "LoRA on raw parameters (target_parameters)"),
    "use_bdlora": (_truthy, "the BD-LoRA variant"),
    "use_qalora": (_truthy, "the QA-LoRA variant"),
    "alora_invocation_tokens": (_truthy, "activated LoRA (alora_invocation_tokens)"),
    "velora_config": (_truthy, "the VeLoRA variant"),
    "kasa_config": (_truthy, "the KaSA variant"),
    "monteclora_config": (_truthy, "the MonteCLoRA variant"),
    "arrow_config": (_truthy, "Arrow routing"),
    "megatron_config": (_truthy, "Megatron parallel layers"),
    "loftq_config": (_truthy, "LoftQ (the adapter belongs to rewritten base weights)"),
    "init_lora_weights": (
        lambda v: v not in PLAIN_INITS,
        "an initialisation that rewrites the base weights or changes the forward "
        f"(init_lora_weights must be one of {PLAIN_INITS})",
    ),
}


def read_peft_adapter(
    peft_dir: Path, model: nn.Module, device: torch.device | str | None = None
) -> tuple[Adapter, str | None]:
    """The LoRA adapter in a PEFT folder, for `model` (ours, with `apply_lora` applied).

    Returns fresh fp32 leaf tensors (requires_grad=True) in the model's module order, on
    `device` (default: the model's), and the config's `base_model_name_or_path`.
    Raises ValueError for anything lathe cannot compute exactly as PEFT does.
    """
    peft_dir = Path(peft_dir)
    config_json = read_adapter_config(peft_dir)
    check_config(config_json, peft_dir)
    wrapped = {m.name: m for m in model.modules() if isinstance(m, LoraLinear)}
    if not wrapped:
        raise ValueError("the model has no LoRA-capable layers: call apply_lora(model) first")
    check_target_names(config_json, peft_dir)
    lora, base_copies = split_tensors(read_adapter_tensors(peft_dir), peft_dir)
    check_base_copies(base_copies, model, peft_dir)
    check_known_modules(lora, wrapped, peft_dir)
    config = lora_config_for(config_json, lora, peft_dir)
    check_weight_tying(config_json, config, model, peft_dir)
    shapes = lora_shapes(model, config)
    check_complete(lora, shapes, peft_dir)
    if device is None:
        device = next(model.parameters()).device
    adapter = Adapter(config)
    for name, (fan_in, fan_out) in shapes.items():  # the model's module order
        a, b = lora[name]["lora_A"], lora[name]["lora_B"]
        check_shapes(name, a, b, config.rank, fan_in, fan_out, peft_dir)
        adapter.a[name] = a.to(device, torch.float32).detach().clone().requires_grad_(True)
        adapter.b[name] = b.to(device, torch.float32).detach().clone().requires_grad_(True)
    return adapter, config_json.get("base_model_name_or_path")


# --- files ------------------------------------------------------------------------------


def read_adapter_config(peft_dir: Path) -> dict[str, Any]:
    path = peft_dir / "adapter_config.json"
    if not path.is_file():
        raise ValueError(f"{peft_dir} is not a PEFT adapter folder: no adapter_config.json")
    return json.loads(path.read_text())


def read_adapter_tensors(peft_dir: Path) -> dict[str, torch.Tensor]:
    safetensors = peft_dir / "adapter_model.safetensors"
    if safetensors.is_file():
        return load_file(str(safetensors))
    pickled = peft_dir / "adapter_model.bin"
    if pickled.is_file():
        # weights_only: a .bin from elsewhere must not be able to run code when loaded.
        return torch.load(pickled, map_location="cpu", weights_only=True)
    raise ValueError(f"{peft_dir}: no adapter_model.safetensors or adapter_model.bin")


def split_tensors(
    tensors: dict[str, torch.Tensor], peft_dir: Path
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """{module: {lora_A, lora_B}} and {base weight name: tensor} from PEFT's key names.

    Accepted keys: `[base_model.model.]<module>.lora_A[.<adapter name>].weight` (PEFT's files
    drop the adapter name, its in-memory state dicts keep it), and copies of base weights
    `<module>.base_layer.weight` / `<module>.weight` that `save_embedding_layers` writes.
    """
    lora: dict[str, dict[str, torch.Tensor]] = {}
    base_copies: dict[str, torch.Tensor] = {}
    adapter_names: set[str] = set()
    for key, tensor in tensors.items():
        parts = key.removeprefix(PEFT_PREFIX).split(".")
        kind_at = [i for i, p in enumerate(parts) if p in LORA_KINDS]
        if not kind_at:
            base_copies[base_weight_name(parts, key, peft_dir)] = tensor
            continue
        i = kind_at[-1]
        rest = parts[i + 1 :]  # ["weight"] or [adapter name, "weight"]
        if i == 0 or not 1 <= len(rest) <= 2 or rest[-1] != "weight":
            raise ValueError(f"{peft_dir}: unexpected tensor {key!r} (only LoRA A/B weights)")
        if len(rest) == 2:
            adapter_names.add(rest[0])
        lora.setdefault(".".join(parts[:i]), {})[parts[i]] = tensor
    if len(adapter_names) > 1:
        raise ValueError(f"{peft_dir}: tensors of several adapters {sorted(adapter_names)}")
    for module, pair in lora.items():
        if set(pair) != set(LORA_KINDS):
            raise ValueError(f"{peft_dir}: {module} has {sorted(pair)} but needs lora_A and lora_B")
    if not lora:
        raise ValueError(f"{peft_dir}: the adapter holds no LoRA weights")
    return lora, base_copies


def base_weight_name(parts: list[str], key: str, peft_dir: Path) -> str:
    """`model.embed_tokens.weight` for `...embed_tokens.base_layer.weight` or `...weight`."""
    if parts[-1] != "weight" or any(p.startswith("lora_") for p in parts):
        # lora_embedding_A/B, lora_magnitude_vector (DoRA), lora_B biases, ...
        raise ValueError(
            f"{peft_dir}: unexpected tensor {key!r}; lathe reads plain LoRA A/B weights of "
            f"linear layers only ({', '.join(LINEAR_TARGETS)})"
        )
    if len(parts) >= 2 and parts[-2] == "base_layer":
        parts = parts[:-2] + parts[-1:]
    return ".".join(parts)


# --- checks -----------------------------------------------------------------------------


def check_config(config_json: dict[str, Any], peft_dir: Path) -> None:
    peft_type = config_json.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{peft_dir}: peft_type is {peft_type!r}; lathe reads LORA adapters only")
    for field_name, (is_problem, why) in UNSUPPORTED.items():
        if field_name in config_json and is_problem(config_json[field_name]):
            value = config_json[field_name]
            raise ValueError(
                f"{peft_dir}: unsupported adapter setting {field_name}={value!r}: {why}; "
                "lathe can only represent plain LoRA"
            )
    for field_name in ("r", "lora_alpha"):
        if not isinstance(config_json.get(field_name), int | float):
            raise ValueError(f"{peft_dir}: adapter_config.json has no numeric {field_name!r}")


def check_target_names(config_json: dict[str, Any], peft_dir: Path) -> None:
    """Listed target modules must be linears lathe adapts (a regex string is checked later,
    through the tensors, which are what actually gets applied)."""
    targets = config_json.get("target_modules")
    if not isinstance(targets, list):
        return
    unknown = sorted({t for t in targets if t.rsplit(".", 1)[-1] not in LINEAR_TARGETS})
    if unknown:
        raise ValueError(
            f"{peft_dir}: target_modules {unknown} are not LoRA-capable layers in lathe "
            f"(it adapts {', '.join(LINEAR_TARGETS)})"
        )


def check_known_modules(
    lora: dict[str, dict[str, torch.Tensor]], wrapped: dict[str, LoraLinear], peft_dir: Path
) -> None:
    unknown = sorted(set(lora) - set(wrapped))
    if unknown:
        raise ValueError(
            f"{peft_dir}: the adapter has weights for {len(unknown)} module(s) that are not "
            f"LoRA-capable linears of this model, e.g. {unknown[:3]} (lathe adapts "
            f"{', '.join(LINEAR_TARGETS)})"
        )


def check_base_copies(copies: dict[str, torch.Tensor], model: nn.Module, peft_dir: Path) -> None:
    """Stored base weights must equal the model's (PEFT stores lm_head's out of caution)."""
    ours = {**dict(model.named_parameters()), **unwrapped_parameters(model)}
    for name, stored in copies.items():
        mine = ours.get(name)
        if mine is None or mine.shape != stored.shape:
            raise ValueError(
                f"{peft_dir}: the adapter stores base weight {name!r}, which this "
                "model does not have in that shape"
            )
        if not same_values(mine.detach().cpu(), stored):
            raise ValueError(
                f"{peft_dir}: the adapter stores its own {name!r} (e.g. a resized or trained "
                "embedding), which differs from this model's; lathe cannot train base weights"
            )


def same_values(mine: torch.Tensor, stored: torch.Tensor) -> bool:
    """Equal, after rounding the more precise of the two to the other's dtype."""
    return torch.equal(mine.to(stored.dtype), stored) or torch.equal(stored.to(mine.dtype), mine)


def unwrapped_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters under their Hugging Face names: `lm_head.weight`, not `lm_head.base.weight`."""
    return {f"{m.name}.weight": m.base.weight for m in model.modules() if isinstance(m, LoraLinear)}


def lora_config_for(
    config_json: dict[str, Any], lora: dict[str, dict[str, torch.Tensor]], peft_dir: Path
) -> LoraConfig:
    leaves = {name.rsplit(".", 1)[-1] for name in lora}
    rank = config_json["r"]
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise ValueError(f"{peft_dir}: r must be an integer, got {rank!r}")
    return LoraConfig(
        rank=rank,
        train_attn=bool(leaves & set(ATTN_TARGETS)),
        train_mlp=bool(leaves & set(MLP_TARGETS)),
        train_unembed=UNEMBED_TARGET in leaves,
        alpha=float(config_json["lora_alpha"]),  # keep the file's alpha: scale = alpha / r
    )


def check_weight_tying(
    config_json: dict[str, Any], config: LoraConfig, model: nn.Module, peft_dir: Path
) -> None:
    """ensure_weight_tying on a tied model also adapts the input embedding (see above)."""
    if config_json.get("ensure_weight_tying") and config.train_unembed and lm_head_is_tied(model):
        raise ValueError(
            f"{peft_dir}: ensure_weight_tying=True with an lm_head adapter on tied embeddings "
            "also adapts embed_tokens, which lathe cannot represent"
        )


def lm_head_is_tied(model: nn.Module) -> bool:
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return any(
        isinstance(m, LoraLinear) and m.name == UNEMBED_TARGET and id(m.base.weight) in embeddings
        for m in model.modules()
    )


def check_complete(
    lora: dict[str, dict[str, torch.Tensor]], shapes: dict[str, tuple[int, int]], peft_dir: Path
) -> None:
    """A LoraConfig adapts all attention (or MLP) projections of every layer, or none."""
    missing = [name for name in shapes if name not in lora]
    if missing:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in missing})
        raise ValueError(
            f"{peft_dir}: partial target set: the adapter lacks {len(missing)} of the "
            f"{len(shapes)} modules its groups need (missing {leaves}, e.g. {missing[0]}); "
            "lathe adapts all attention projections (q/k/v/o) of every layer or none, and "
            "all MLP projections (gate/up/down) of every layer or none"
        )


def check_shapes(
    name: str,
    a: torch.Tensor,
    b: torch.Tensor,
    rank: int,
    fan_in: int,
    fan_out: int,
    peft_dir: Path,
) -> None:
    if tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank):
        raise ValueError(
            f"{peft_dir}: shape mismatch for {name}: lora_A {tuple(a.shape)}, lora_B "
            f"{tuple(b.shape)}; this model with r={rank} needs ({rank}, {fan_in}) and "
            f"({fan_out}, {rank})"
        )
