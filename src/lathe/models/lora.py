"""Multi-adapter LoRA, applied to a base model from outside.

`apply_lora(model)` wraps every attention and MLP projection and the unembedding of a base
model once. The base weights stay frozen and shared; each adapter owns its own small tensors.
Which adapter applies to which rows of a batch is set per forward pass with `use_adapters`,
so one pass can serve rows of several adapters (and base-model rows): the frozen base runs
once, then each row group adds its own low-rank delta `x A^T B^T · alpha/rank`, all groups
together in one batched operation (models/multi_lora.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lathe.models.multi_lora import RowPlan, add_deltas
from lathe.protocol.messages import (  # noqa: F401  (re-exported for engine code)
    ATTN_TARGETS,
    LORA_ALPHA,
    MLP_TARGETS,
    UNEMBED_TARGET,
    LoraConfig,
)


@dataclass
class Adapter:
    """One LoRA adapter: fp32 A/B per targeted module name (e.g. `model.layers.0.mlp.up_proj`)."""

    config: LoraConfig
    a: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (rank, in)
    b: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (out, rank)

    def parameters(self) -> list[torch.Tensor]:
        """All tensors in a fixed order (module order, A before B): the optimizer's order."""
        return [t for name in self.a for t in (self.a[name], self.b[name])]

    def named_tensors(self) -> Iterator[tuple[str, str, torch.Tensor]]:
        for name in self.a:
            yield name, "lora_A", self.a[name]
            yield name, "lora_B", self.b[name]

    def frozen_copy(self) -> Adapter:
        """Detached clones: a sampler snapshot that later training cannot change."""
        return Adapter(
            self.config,
            {k: v.detach().clone() for k, v in self.a.items()},
            {k: v.detach().clone() for k, v in self.b.items()},
        )

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.parameters())


@dataclass(frozen=True)
class RowGroup:
    """Token rows [start, stop) of the flattened (B * T) batch use `adapter` (None: base only).

    stop=None means to the end of the batch.
    """

    start: int
    stop: int | None
    adapter: Adapter | None


def whole_batch(adapter: Adapter | None) -> list[RowGroup]:
    return [RowGroup(0, None, adapter)]


_plan: contextvars.ContextVar[RowPlan | None] = contextvars.ContextVar(
    "lathe_lora_plan", default=None
)
_row_invariant: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "lathe_row_invariant", default=False
)
ROW_BLOCK = 8  # matmul rows are padded to a multiple of this in row-invariant mode


@contextlib.contextmanager
def use_adapters(groups: list[RowGroup], row_invariant: bool = False) -> Iterator[None]:
    """Forward passes inside the block use `groups` as the row-to-adapter assignment.

    With `row_invariant`, every matmul pads its rows to a multiple of ROW_BLOCK: the CPU
    kernels then give each row the same numbers whatever else is in the batch (a row's
    result otherwise shifts in the last bits with the batch size), which the sampler needs
    for results independent of what else is being sampled. The multi-adapter delta's batched
    matmuls then pad each adapter's row segments to a multiple of ROW_BLOCK too.
    """
    plan = RowPlan(tuple(groups), ROW_BLOCK if row_invariant else 1)
    token = _plan.set(plan)
    token_inv = _row_invariant.set(row_invariant)
    try:
        yield
    finally:
        plan.close()
        _plan.reset(token)
        _row_invariant.reset(token_inv)


def matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, in) @ w.T (+ bias), rows padded to ROW_BLOCK in row-invariant mode."""
    if not _row_invariant.get() or x.shape[0] % ROW_BLOCK == 0:
        return F.linear(x, w, bias)
    m = x.shape[0]
    padded = torch.cat([x, x.new_zeros(ROW_BLOCK - m % ROW_BLOCK, x.shape[1])])
    return F.linear(padded, w, bias)[:m]


class LoraLinear(nn.Module):
    """A frozen linear layer plus the deltas of whichever adapters the current batch uses."""

    def __init__(self, base: nn.Linear, name: str) -> None:
        super().__init__()
        self.base = base
        self.name = name

    @property
    def weight(self) -> torch.Tensor:  # keeps code that reads `.weight` (weight tying) working
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # (M, in): rows are tokens
        y = matmul(x2, self.base.weight, self.base.bias)
        plan = _plan.get()
        if plan is not None:
            layout = plan.layout(x2.shape[0], x2.device)  # built by the first module, reused
            if layout.sole is not None:  # one adapter for every row: plain matmuls
                y = self._add_delta(y, x2, layout.sole)
            elif _row_invariant.get() and torch.is_grad_enabled():
                # Bitwise the gradients an adapter gets alone: the same matmuls over its own
                # rows (the batched op's reductions over padded segments sum differently).
                y = self._add_group_deltas(y, x2, plan.groups)
            else:  # each row its own adapter's delta (or none), all in one batched op
                y = add_deltas(y, x2, layout, self.name)
        return y.reshape(*lead, y.shape[-1])

    def _add_group_deltas(
        self, y: torch.Tensor, x: torch.Tensor, groups: tuple[RowGroup, ...]
    ) -> torch.Tensor:
        """Each row group's delta as its own matmuls, the pieces joined in one cat (so that
        backward joins their gradients in one cat too)."""
        sizes = [(y.shape[0] if g.stop is None else g.stop) - g.start for g in groups]
        pieces = zip(y.split(sizes), x.split(sizes), groups, strict=True)
        out = [
            yg if g.adapter is None else self._add_delta(yg, xg, g.adapter) for yg, xg, g in pieces
        ]
        return torch.cat(out)

    def _add_delta(self, y: torch.Tensor, x: torch.Tensor, adapter: Adapter) -> torch.Tensor:
        """y + (x A^T B^T) * scale, scaling the small (rows, rank) product rather than y's size."""
        if self.name not in adapter.a:
            return y
        a = adapter.a[self.name].to(x.dtype)
        b = adapter.b[self.name].to(x.dtype)
        h = matmul(x, a) * adapter.config.scale
        if _row_invariant.get():
            return y + matmul(h, b)
        return torch.addmm(y, h, b.t())  # one pass over y instead of a delta and a sum


def apply_lora(model: nn.Module) -> list[str]:
    """Wrap every LoRA-capable linear of `model` in place; return the wrapped module names."""
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            leaf_ok = child_name in ATTN_TARGETS + MLP_TARGETS + (UNEMBED_TARGET,)
            if leaf_ok and isinstance(child, nn.Linear):
                setattr(module, child_name, LoraLinear(child, full))
                wrapped.append(full)
    return wrapped


def lora_shapes(model: nn.Module, config: LoraConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every module the config targets, in module order."""
    return {
        m.name: (m.base.in_features, m.base.out_features)
        for m in model.modules()
        if isinstance(m, LoraLinear) and config.targets(m.name)
    }


def new_adapter(model: nn.Module, config: LoraConfig, seed: int | None) -> Adapter:
    """Fresh adapter as PEFT initialises it: A ~ kaiming-uniform(a=sqrt 5), B = 0.

    With B = 0 the adapted model starts equal to the base model. A seed makes the init
    reproducible; without one it is drawn from fresh entropy.
    """
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    device = next(model.parameters()).device
    adapter = Adapter(config)
    for name, (fan_in, fan_out) in lora_shapes(model, config).items():
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_ with a=sqrt(5)
        # Drawn on the CPU so that a seed gives the same adapter on every device.
        a = torch.empty(config.rank, fan_in).uniform_(-bound, bound, generator=gen)
        adapter.a[name] = a.to(device).requires_grad_(True)
        adapter.b[name] = torch.zeros(fan_out, config.rank, device=device, requires_grad=True)
    return adapter
