"""A memory budget for training adapters: idle ones are swapped to disk and back, unseen.

At most `max_resident` adapters (weights, accumulated gradients, AdamW moments) stay in
memory; touching one that is swapped out brings it back, and the least recently used
resident one goes to `<data dir>/swap/<model_id>.safetensors`. Everything is saved as fp32
tensors, so a swapped adapter continues bit for bit where it left off. Adapters used by the
batch being run are pinned (the budget may be exceeded for the length of one batch).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lathe.engine.optim import AdapterOptimizer
from lathe.models.lora import Adapter
from lathe.protocol.messages import LoraConfig


@dataclass
class TrainingModel:
    """One client training model: an adapter with its optimizer on a base model."""

    model_id: str
    base: object  # the runner's BaseModel (typed loosely to keep this module torch-light)
    adapter: Adapter | None  # None while swapped out
    optimizer: AdapterOptimizer | None
    config: LoraConfig
    last_used: int = 0


class Residency:
    def __init__(self, max_resident: int, swap_dir: Path | None) -> None:
        self.max_resident = max_resident
        self.swap_dir = swap_dir
        self._models: dict[str, TrainingModel] = {}
        self._clock = itertools.count(1)
        self.swaps_out = 0  # counters, for status and tests
        self.swaps_in = 0

    def __contains__(self, model_id: str) -> bool:
        return model_id in self._models

    def __iter__(self) -> Iterator[TrainingModel]:
        return iter(list(self._models.values()))

    def __getitem__(self, model_id: str) -> TrainingModel:
        tm = self.get(model_id)
        if tm is None:
            raise KeyError(model_id)
        return tm

    def __len__(self) -> int:
        return len(self._models)

    def put(self, tm: TrainingModel) -> None:
        self.drop(tm.model_id)
        tm.last_used = next(self._clock)
        self._models[tm.model_id] = tm
        self.enforce(pinned={tm.model_id})

    def get(self, model_id: str, pinned: set[str] | None = None) -> TrainingModel | None:
        """The model, in memory (swapped in if needed); None if unknown."""
        tm = self._models.get(model_id)
        if tm is None:
            return None
        tm.last_used = next(self._clock)
        if tm.adapter is None:
            self.swap_in(tm)
            self.enforce(pinned={model_id, *(pinned or set())})
        return tm

    def drop(self, model_id: str) -> None:
        tm = self._models.pop(model_id, None)
        if tm is not None and self.swap_dir is not None:
            self.swap_path(model_id).unlink(missing_ok=True)

    def resident(self) -> list[TrainingModel]:
        return [tm for tm in self._models.values() if tm.adapter is not None]

    def enforce(self, pinned: set[str]) -> None:
        """Swap out least recently used adapters until the budget holds."""
        if self.swap_dir is None:
            return
        resident = sorted(self.resident(), key=lambda tm: tm.last_used)
        excess = len(resident) - self.max_resident
        for tm in resident:
            if excess <= 0:
                break
            if tm.model_id not in pinned:
                self.swap_out(tm)
                excess -= 1

    def swap_path(self, model_id: str) -> Path:
        assert self.swap_dir is not None
        return self.swap_dir / f"{model_id}.safetensors"

    def swap_out(self, tm: TrainingModel) -> None:
        assert tm.adapter is not None and tm.optimizer is not None
        tensors: dict[str, torch.Tensor] = {}
        for name, kind, t in tm.adapter.named_tensors():
            tensors[f"w.{name}.{kind}"] = t.detach().cpu()
            if t.grad is not None:
                tensors[f"g.{name}.{kind}"] = t.grad.detach().cpu()
        for key, value in tm.optimizer.state_tensors().items():
            tensors[f"o.{key}"] = value
        self.swap_dir.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(self.swap_path(tm.model_id)),
            metadata={"modules": ",".join(tm.adapter.a)},
        )
        tm.adapter, tm.optimizer = None, None
        self.swaps_out += 1

    def swap_in(self, tm: TrainingModel) -> None:
        path = self.swap_path(tm.model_id)
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:  # module order: the optimizer's order
            names = f.metadata()["modules"].split(",")
        device = next(tm.base.module.parameters()).device  # type: ignore[attr-defined]
        adapter = Adapter(tm.config)
        for name in names:
            for kind, store in (("lora_A", adapter.a), ("lora_B", adapter.b)):
                t = tensors[f"w.{name}.{kind}"].to(device).requires_grad_(True)
                if (g := tensors.get(f"g.{name}.{kind}")) is not None:
                    t.grad = g.to(device)
                store[name] = t
        optimizer = AdapterOptimizer(adapter)
        optimizer.load_state_tensors({k[2:]: v for k, v in tensors.items() if k.startswith("o.")})
        tm.adapter, tm.optimizer = adapter, optimizer
        path.unlink()
        self.swaps_in += 1
