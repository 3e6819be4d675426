"""Building an engine from its spec: base models loaded, runner and loop made, nothing started."""

from __future__ import annotations

import torch

from lathe.engine.group import Group
from lathe.engine.host_memory import keep_freed_memory
from lathe.engine.loop import Engine
from lathe.engine.runner import Runner, load_base_model, torch_dtype
from lathe.models.fused import compile_wanted
from lathe.protocol import messages as m


def check_device(device: str) -> None:
    """A clear error for a device this torch cannot use (rather than a failure deep inside
    loading)."""
    kind = torch.device(device).type
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"--device {device}: torch {torch.__version__} sees no CUDA device (a CPU build "
                "of torch, no GPU, or no driver); serve with --device cpu"
            )
        index = torch.device(device).index or 0
        if index >= torch.cuda.device_count():
            raise RuntimeError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif kind != "cpu":
        raise RuntimeError(f"--device {device}: only cpu and cuda devices are supported")


def build_engine(spec: m.EngineSpec, group: Group | None = None) -> Engine:
    """The engine of `spec`; in a group (engine/group.py) this rank's, its base models
    sharded across the ranks."""
    device = spec.device if group is None else group.device
    check_device(device)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if device == "cpu":
        keep_freed_memory()
    compiled = compile_wanted(spec.compile, device)
    dtype = torch_dtype(spec.dtype, device)
    base_models = {
        name: load_base_model(name, path, dtype, device, compiled)
        for name, path in spec.models.items()
    }
    swap_dir = spec.swap_dir
    if group is not None:
        for base in base_models.values():
            group.shard(base.module)
        per_rank = group.parameters_per_rank([b.module for b in base_models.values()])
        if group.rank > 0 and swap_dir is not None:
            swap_dir = swap_dir / f"rank-{group.rank}"  # each rank swaps its own copies
    runner = Runner(
        base_models,
        token_budget=spec.microbatch_tokens,
        deterministic=spec.deterministic,
        checkpoint_tokens=spec.checkpoint_activations_above,
        max_resident_adapters=spec.max_resident_adapters,
        swap_dir=swap_dir,
        kv_budget_tokens=spec.kv_cache_tokens,
        lost_sampler_ids=spec.lost_sampler_ids,
        group=group,
    )
    if group is None:
        return Engine(runner, spec.lost_model_ids)
    facts = {"ranks": group.world, "base_parameters_per_rank": per_rank}
    return Engine(runner, spec.lost_model_ids, group if group.rank == 0 else None, facts)
