"""forward / forward_backward: losses, outputs and metrics, for one request or several.

Requests of different adapters on one base model can run together (co-batching): their
datums share micro-batches (engine/batching.py `co_batches`), the frozen base runs once per
micro-batch, each adapter adds its delta to its own rows, and one backward pass gives each
adapter the gradient of its own loss only (adapters share no tensors). Gradients accumulate
into the adapters' tensors until optim_step and are never touched when `forward_only`.

A micro-batch runs as one packed stream of its datums (engine/batching.py): the matmuls cost
its real tokens, attention stays within each datum. With `deterministic`, matmuls and
attention are batch-invariant (models/invariant.py), so a request's outputs and gradients
are bitwise the same alone or co-batched.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lathe.engine.batching import PaddedBatch, Part, co_batches, pad, stream
from lathe.engine.custom_loss import run_loss
from lathe.engine.losses import LOSSES, LossBatch
from lathe.engine.target_logprobs import target_logprobs
from lathe.models.document_attention import DocumentAttention
from lathe.models.layer_checkpoint import checkpointing
from lathe.models.lora import Adapter, RowGroup, use_adapters
from lathe.models.transfer import fetch, to_device
from lathe.protocol import messages as m
from lathe.protocol.loss_graph import LossGraph
from lathe.protocol.loss_specs import LOSS_SPECS


@dataclass(frozen=True)
class Batching:
    """How training micro-batches are formed and run."""

    token_budget: int = 16384  # tokens of one micro-batch (packed: real tokens only)
    deterministic: bool = False  # batch-invariant matmuls and attention: bitwise co-batching
    checkpoint_tokens: int = 8192  # micro-batches above this recompute layers in the backward


@dataclass(frozen=True)
class Job:
    """One forward/forward_backward request and the adapter it runs with."""

    adapter: Adapter
    req: m.ForwardBackwardRequest


def input_fill(jobs: list[Job]) -> dict[str, float | None]:
    """Per-token inputs to pad: every loss's, with its value for datums that lack it."""
    fill: dict[str, float | None] = {}
    for job in jobs:
        if job.req.custom_loss is None:  # custom losses read theirs from the datums
            spec = LOSS_SPECS[job.req.loss_fn]
            fill.update({**dict.fromkeys(spec.required), **spec.optional})
    return fill


def forward_backward(
    model: nn.Module, jobs: list[Job], how: Batching
) -> list[m.ForwardBackwardResult]:
    """Run the requests together (all forward-only or all not); one result per request.

    Nothing waits for the device until the end: per-datum outputs, losses and metrics stay
    device tensors (`Pending`) and come to the host in one transfer (models/transfer.py).
    In an engine group the work is split across the ranks instead (engine/data_parallel.py).
    """
    pending = [Pending(len(j.req.data)) for j in jobs]
    for parts in co_batches([j.req.data for j in jobs], how.token_budget):
        long = sum(p.tokens for p in parts) > how.checkpoint_tokens
        run_micro_batch(model, jobs, parts, how, pending, long)
    return finish(jobs, resolve(pending))


def run_micro_batch(
    model: nn.Module,
    jobs: list[Job],
    parts: list[Part],
    how: Batching,
    pending: list[Pending],
    long: bool,
) -> None:
    """One micro-batch: forward, losses, and (unless forward-only) backward into the adapters'
    gradients; its outputs and metrics go to `pending`. `long`: keep one layer's activations
    at a time and recompute the rest in the backward pass."""
    device = next(model.parameters()).device
    backward = not jobs[0].req.forward_only
    deterministic = how.deterministic
    datums = [jobs[p.job].req.data[i] for p in parts for i in p.rows]
    batch = pad(datums, input_fill(jobs), device)  # the losses' (B, T) layout
    packed = stream(datums, device)  # the model's: every datum end to end
    groups, rows, tokens = [], [0], [0]  # per part: its adapter's tokens; its datum rows
    for p in parts:
        rows.append(rows[-1] + len(p.rows))
        tokens.append(tokens[-1] + p.tokens)
        groups.append(RowGroup(tokens[-2], tokens[-1], jobs[p.job].adapter))
    attention = DocumentAttention(packed.lengths, deterministic)
    with (
        torch.set_grad_enabled(backward),
        use_adapters(groups, row_invariant=deterministic),
        checkpointing(long),
    ):
        hidden = model.hidden_states(packed.ids, packed.positions, attention)[0]  # (N, hidden)
        spans = [
            (r0, r1, jobs[p.job].adapter)
            for p, r0, r1 in zip(parts, rows[:-1], rows[1:], strict=True)
        ]
        logp = target_logprobs(  # (b, T, K), the logits never whole (target_logprobs.py)
            model.lm_head, hidden, batch.targets, batch.lengths, spans, deterministic
        )
        total = logp.new_zeros(())
        for p, r0, r1 in zip(parts, rows[:-1], rows[1:], strict=True):
            own = batch.rows(r0, r1)  # the part's datums as padded alone
            own_logp = logp[r0:r1, : own.targets.shape[1], : own.targets.shape[2]]
            total = total + run_part(jobs[p.job], p, own_logp, own, pending[p.job])
        if backward:
            total.backward()


Resolved = tuple[list[dict[str, np.ndarray]], dict[str, float]]  # per-datum outputs, sums


def resolve(pending: list[Pending]) -> list[Resolved]:
    """Every request's outputs and metric sums, brought to the host in one transfer."""
    values = iter(fetch([t for p in pending for t in p.tensors]))  # the step's one transfer
    return [p.resolve(values) for p in pending]


def finish(jobs: list[Job], resolved: list[Resolved]) -> list[m.ForwardBackwardResult]:
    """The results: ":mean" metrics are the sums over the request's datums, divided."""
    results = []
    for job, (outputs, sums) in zip(jobs, resolved, strict=True):
        n = len(job.req.data)
        metrics = {k: v / n if k.endswith(":mean") else v for k, v in sums.items()}
        results.append(m.ForwardBackwardResult(outputs=outputs, metrics=metrics))
    return results


class Pending:
    """One request's results while they are still device tensors, in the order they arose."""

    def __init__(self, num_datums: int) -> None:
        self.num_datums = num_datums
        self.tensors: list[torch.Tensor] = []
        # per tensor: ("sum", metric name, times) to add up (times it, on the host), or
        # (output key, datum index, 1.0) of a per-datum output
        self.slots: list[tuple[str, str | int, float]] = []

    def add_sum(self, name: str, value: torch.Tensor, times: float = 1.0) -> None:
        self.tensors.append(value.detach())
        self.slots.append(("sum", name, times))

    def add_output(self, key: str, datum: int, value: torch.Tensor) -> None:
        self.tensors.append(value.detach())
        self.slots.append((key, datum, 1.0))

    def resolve(self, values) -> tuple[list[dict[str, np.ndarray]], dict[str, float]]:
        """Take this request's values (in order) from the fetched ones."""
        outputs: list[dict[str, np.ndarray]] = [{} for _ in range(self.num_datums)]
        sums: dict[str, float] = defaultdict(float)
        for kind, which, times in self.slots:
            value = next(values)
            if kind == "sum":  # fp32 values added up in Python floats, as they always were
                sums[str(which)] += float(value) * times
            else:
                outputs[int(which)][kind] = value.astype(np.float32)
        return outputs, sums


def run_part(
    job: Job, part: Part, logp: torch.Tensor, batch: PaddedBatch, pending: Pending
) -> torch.Tensor:
    """One request's rows of a micro-batch: its loss (returned); its outputs and metrics go
    to `pending`."""
    if job.req.custom_loss is not None:
        loss, elementwise, metrics = custom(job.req.custom_loss, logp, batch, part.rows, job.req)
    else:
        loss, elementwise, metrics = builtin(job.req, logp, batch)
    pending.add_sum("loss:sum", loss)
    for key, value, times in metrics:
        pending.add_sum(key, value, times)
    for row, i in enumerate(part.rows):
        n = batch.lengths[row]
        pending.add_output("logprobs", i, per_datum(logp[row, :n], batch, row))
        if elementwise is not None:
            pending.add_output("elementwise_loss", i, per_datum(elementwise[row, :n], batch, row))
    return loss


def per_datum(x: torch.Tensor, batch: PaddedBatch, row: int) -> torch.Tensor:
    """(n, K) -> the datum's own target shape: (n,) or (n, K_datum)."""
    if not batch.two_d:
        return x[:, 0]
    return x[:, : batch.widths[row]]


# A loss's metrics: (name, scalar tensor, multiplier), added up per name on the host.
Metrics = list[tuple[str, torch.Tensor, float]]


def builtin(
    req: m.ForwardBackwardRequest, logp: torch.Tensor, batch: PaddedBatch
) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
    spec = LOSS_SPECS[req.loss_fn]
    config = {**spec.config, **{k: float(v) for k, v in req.loss_config.items()}}
    names = {*spec.required, *spec.optional}
    inputs = {k: v for k, v in batch.inputs.items() if k in names}
    if batch.two_d:  # (b, T, K) with a (b, T, 1) mask
        lb = LossBatch(logp, inputs, batch.mask, config)
    else:  # one target per position: losses see (b, T)
        lb = LossBatch(
            logp[..., 0], {k: v[..., 0] for k, v in inputs.items()}, batch.mask[..., 0], config
        )
    result = LOSSES[req.loss_fn](lb)
    elementwise = result.elementwise if batch.two_d else result.elementwise[..., None]
    b = len(batch.lengths)
    # Per-datum means come back as a mean over this micro-batch's datums: weight by count.
    metrics = [(k, v, float(b)) for k, v in result.metrics.items()]
    return result.elementwise.sum(), elementwise, metrics


def custom(
    graph: LossGraph,
    logp: torch.Tensor,
    batch: PaddedBatch,
    rows: list[int],
    req: m.ForwardBackwardRequest,
) -> tuple[torch.Tensor, None, Metrics]:
    """Per-datum traced losses, summed; metrics ":sum" add up and ":mean" average over datums."""
    total = logp.new_zeros(())
    metrics: Metrics = []
    for row, i in enumerate(rows):
        n = batch.lengths[row]
        lp = logp[row, :n, 0] if graph.input_ranks[0] == 1 else logp[row, :n, : batch.widths[row]]
        args = [lp]
        for name, rank in zip(graph.input_names[1:], graph.input_ranks[1:], strict=True):
            arr = req.data[i].loss_inputs[name]
            t = to_device(arr, torch.from_numpy(arr).dtype, logp.device)
            args.append(t.reshape(()) if rank == 0 else t)
        loss, datum_metrics = run_loss(graph, args)
        total = total + loss
        metrics += [(key, value, 1.0) for key, value in datum_metrics.items()]
    return total, None, metrics
