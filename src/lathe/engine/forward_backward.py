"""forward / forward_backward of one training model: losses, outputs and metrics.

The batch runs in length-sorted micro-batches (engine/batching.py); gradients accumulate
into the adapter's tensors across micro-batches and across calls until optim_step, and are
never touched when `forward_only`.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torch import nn

from lathe.engine import messages as m
from lathe.engine.batching import PaddedBatch, length_groups, pad
from lathe.engine.custom_loss import run_loss
from lathe.engine.custom_loss_graph import LossGraph
from lathe.engine.lora import Adapter, use_adapters, whole_batch
from lathe.engine.losses import LOSSES, LossBatch


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target): logits (B, T, V), targets (B, T, K) -> (B, T, K)."""
    return logits.gather(-1, targets) - torch.logsumexp(logits, dim=-1, keepdim=True)


def forward_backward(
    model: nn.Module, adapter: Adapter, req: m.ForwardBackwardRequest, token_budget: int
) -> m.ForwardBackwardResult:
    device = next(model.parameters()).device
    outputs: list[dict[str, np.ndarray]] = [{} for _ in req.data]
    sums: dict[str, float] = defaultdict(float)  # "x:sum" totals and datum-weighted means
    spec = None if req.custom_loss else LOSSES[req.loss_fn]
    # Per-token inputs the loss reads (custom losses read theirs from the datums themselves).
    fill = {**dict.fromkeys(spec.required), **spec.optional} if spec else {}
    for group in length_groups(req.data, token_budget):
        batch = pad([req.data[i] for i in group], fill, device)
        with torch.set_grad_enabled(not req.forward_only):
            with use_adapters(whole_batch(adapter)):
                logits = model(batch.ids).float()  # (b, T, V)
            logp = token_logprobs(logits, batch.targets)  # (b, T, K)
            del logits
            if req.custom_loss is not None:
                loss, elementwise, metrics = custom(req.custom_loss, logp, batch, group, req)
            else:
                loss, elementwise, metrics = builtin(req, logp, batch)
            if not req.forward_only:
                loss.backward()
        sums["loss:sum"] += float(loss.detach())
        for key, value in metrics.items():
            sums[key] += value
        for row, i in enumerate(group):
            n = batch.lengths[row]
            out = {"logprobs": per_datum(logp[row, :n], batch, row)}
            if elementwise is not None:
                out["elementwise_loss"] = per_datum(elementwise[row, :n], batch, row)
            outputs[i] = out
    n_data = len(req.data)
    metrics = {k: v / n_data if k.endswith(":mean") else v for k, v in sums.items()}
    return m.ForwardBackwardResult(outputs=outputs, metrics=metrics)


def per_datum(x: torch.Tensor, batch: PaddedBatch, row: int) -> np.ndarray:
    """(n, K) -> the datum's own target shape: (n,) or (n, K_datum)."""
    x = x.detach().float().cpu()
    if not batch.two_d:
        return x[:, 0].numpy()
    return x[:, : batch.widths[row]].numpy()


def builtin(
    req: m.ForwardBackwardRequest, logp: torch.Tensor, batch: PaddedBatch
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    spec = LOSSES[req.loss_fn]
    config = {**spec.config, **{k: float(v) for k, v in req.loss_config.items()}}
    if batch.two_d:  # (b, T, K) with a (b, T, 1) mask
        lb = LossBatch(logp, batch.inputs, batch.mask, config)
    else:  # one target per position: losses see (b, T)
        inputs = {k: v[..., 0] for k, v in batch.inputs.items()}
        lb = LossBatch(logp[..., 0], inputs, batch.mask[..., 0], config)
    result = spec.fn(lb)
    elementwise = result.elementwise if batch.two_d else result.elementwise[..., None]
    b = len(batch.lengths)
    # Per-datum means come back as a mean over this micro-batch's datums: weight by count.
    metrics = {k: float(v.detach()) * b for k, v in result.metrics.items()}
    return result.elementwise.sum(), elementwise, metrics


def custom(
    graph: LossGraph,
    logp: torch.Tensor,
    batch: PaddedBatch,
    group: list[int],
    req: m.ForwardBackwardRequest,
) -> tuple[torch.Tensor, None, dict[str, float]]:
    """Per-datum traced losses, summed; metrics ":sum" add up and ":mean" average over datums."""
    total = logp.new_zeros(())
    metrics: dict[str, float] = defaultdict(float)
    for row, i in enumerate(group):
        n = batch.lengths[row]
        lp = logp[row, :n, 0] if graph.input_ranks[0] == 1 else logp[row, :n, : batch.widths[row]]
        args = [lp]
        for name, rank in zip(graph.input_names[1:], graph.input_ranks[1:], strict=True):
            arr = req.data[i].loss_inputs[name]
            t = torch.from_numpy(arr).to(logp.device)
            args.append(t.reshape(()) if rank == 0 else t)
        loss, datum_metrics = run_loss(graph, args)
        total = total + loss
        for key, value in datum_metrics.items():
            metrics[key] += float(value.detach())
    return total, None, metrics
