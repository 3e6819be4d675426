"""One decode-shaped forward step with many adapters: the batched LoRA delta vs base only.

64 rows of one token each (a decode step of 64 sequences) through the bench model of
train_throughput.py: `hidden_states` + `lm_head`, the model's default causal attention on
length-1 rows, row-invariant matmuls as the sampler runs them, freed memory kept in the heap
as the engine keeps it. Setups: base-model rows only; 8 rank-16 frozen adapters on 56 rows
plus 8 base rows, with the batched delta (models/multi_lora.py); the same with the per-group
loop it replaced (kept below for the comparison); one adapter on every row (plain matmuls).
Prints the fastest round's median ms per step and its ratio to the base-only step.

    python bench/multi_lora_step.py [--rows 64] [--adapters 8] [--base-rows 8] [--rank 16]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from train_throughput import NAME, SPEC

from lathe.engine.host_memory import keep_freed_memory
from lathe.engine.runner import load_base_model
from lathe.models import lora
from lathe.models.lora import LoraConfig, LoraLinear, RowGroup, new_adapter, use_adapters
from lathe.testing.tiny_models import make_tiny


def per_group_forward(self: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """LoraLinear.forward before the batched delta: a matmul pair per row group, then a cat."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y = lora.matmul(x2, self.base.weight, self.base.bias)
    plan = lora._plan.get()
    groups = plan.groups if plan is not None else ()
    if any(g.adapter is not None and self.name in g.adapter.a for g in groups):
        if len(groups) == 1 and groups[0].start == 0 and groups[0].stop is None:
            y = self._add_delta(y, x2, groups[0].adapter)
        else:
            sizes = [(y.shape[0] if g.stop is None else g.stop) - g.start for g in groups]
            pieces = zip(y.split(sizes), x2.split(sizes), groups, strict=True)
            y = torch.cat(
                [
                    yg if g.adapter is None else self._add_delta(yg, xg, g.adapter)
                    for yg, xg, g in pieces
                ]
            )
    return y.reshape(*lead, y.shape[-1])


@contextlib.contextmanager
def per_group_loop() -> Iterator[None]:
    batched = LoraLinear.forward
    LoraLinear.forward = per_group_forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        LoraLinear.forward = batched  # type: ignore[method-assign]


def frozen_adapters(model: nn.Module, n: int, rank: int) -> list[lora.Adapter]:
    """Sampler snapshots with random B (so the deltas are not zero)."""
    out = []
    for i in range(n):
        ad = new_adapter(model, LoraConfig(rank=rank), seed=i)
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for b in ad.b.values():
                b.copy_(torch.randn(b.shape, generator=gen) * 0.02)
        out.append(ad.frozen_copy())
    return out


def spread(adapters: list[lora.Adapter], rows: int, base_rows: int) -> list[RowGroup]:
    """Adapter rows in equal contiguous groups (the sampler sorts rows by adapter), base last."""
    groups, at = [], 0
    per = (rows - base_rows) // len(adapters)
    for i, ad in enumerate(adapters):
        stop = rows - base_rows if i == len(adapters) - 1 else at + per
        groups.append(RowGroup(at, stop, ad))
        at = stop
    if base_rows:
        groups.append(RowGroup(at, rows, None))
    return groups


def step_time(model: nn.Module, ids: torch.Tensor, groups: list[RowGroup], steps: int) -> float:
    """Median seconds of one decode-shaped step (hidden states, then logits of every row)."""

    def step() -> float:
        start = time.perf_counter()
        with torch.no_grad(), use_adapters(groups, row_invariant=True):
            hidden = model.hidden_states(ids)  # (rows, 1, hidden)
            model.lm_head(hidden[:, -1])  # (rows, V)
        return time.perf_counter() - start

    step()
    return statistics.median(step() for _ in range(steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--base-rows", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="setups alternate each round")
    args = parser.parse_args()
    keep_freed_memory()  # as `lathe serve`'s engine does: no page faults on big tensors

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny(Path(tmp) / NAME, SPEC)
        model = load_base_model(NAME, model_dir, torch.float32, "cpu").module
    ads = frozen_adapters(model, args.adapters, args.rank)
    ids = torch.randint(0, 8000, (args.rows, 1), generator=torch.Generator().manual_seed(0))
    mixed = spread(ads, args.rows, args.base_rows)
    label = f"{args.adapters} rank-{args.rank} adapters on {args.rows - args.base_rows} rows"
    label += f" + {args.base_rows} base rows"
    setups: list[tuple[str, list[RowGroup], Callable[[], contextlib.AbstractContextManager]]] = [
        (f"base model only, {args.rows} rows", [RowGroup(0, None, None)], contextlib.nullcontext),
        (f"{label}, batched delta", mixed, contextlib.nullcontext),
        (f"{label}, per-group loop (before)", mixed, per_group_loop),
        (
            f"1 rank-{args.rank} adapter on all {args.rows} rows",
            [RowGroup(0, None, ads[0])],
            contextlib.nullcontext,
        ),
    ]
    times: dict[str, list[float]] = {name: [] for name, _, _ in setups}
    for _ in range(args.rounds):  # alternated, so that drifts of the machine hit all alike
        for name, groups, mode in setups:
            with mode():
                times[name].append(step_time(model, ids, groups, args.steps))

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"decode-shaped step: {args.rows} rows x 1 token, fp32, row-invariant matmuls")
    print("| setup | ms / step | / base only |")
    print("|---|---:|---:|")
    base = min(times[setups[0][0]])
    for name, _, _ in setups:
        best = min(times[name])  # the fastest round: the least disturbed by other work
        print(f"| {name} | {best * 1e3:.2f} | {best / base:.2f} |")


if __name__ == "__main__":
    main()
