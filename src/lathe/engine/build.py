"""Building an engine from its spec: base models loaded, runner and loop made, nothing started."""

from __future__ import annotations

import torch

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


def build_engine(spec: m.EngineSpec) -> Engine:
    check_device(spec.device)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if spec.device == "cpu":
        keep_freed_memory()
    compiled = compile_wanted(spec.compile, spec.device)
    dtype = torch_dtype(spec.dtype, spec.device)
    base_models = {
        name: load_base_model(name, path, dtype, spec.device, compiled)
        for name, path in spec.models.items()
    }
    runner = Runner(
        base_models,
        token_budget=spec.microbatch_tokens,
        deterministic=spec.deterministic,
        checkpoint_tokens=spec.checkpoint_activations_above,
        max_resident_adapters=spec.max_resident_adapters,
        swap_dir=spec.swap_dir,
        kv_budget_tokens=spec.kv_cache_tokens,
        lost_sampler_ids=spec.lost_sampler_ids,
    )
    return Engine(runner, spec.lost_model_ids)
