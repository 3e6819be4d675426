"""forward / forward_backward on an engine group: each rank runs its share of the datums.

Every rank holds the whole step (engine/group.py), so every rank computes the same split
without talking: each request's datums are cut into one contiguous run per rank, balanced by
tokens, and each rank packs its runs into micro-batches as one rank would (engine/batching.py).
The ranks run their micro-batches in rounds; FSDP2 all-gathers each layer's weights in every
forward and backward pass, so every rank must make the same passes: a rank with no
micro-batch left in a round runs an idle one-token pass whose loss is multiplied by zero, and
a round recomputes layers in the backward pass on every rank if it does on one.

Gradients: each rank adds its datums' gradients to the (replicated) adapters; one all-reduce
then sums the step's new gradients across the ranks and adds them to what earlier
forward_backward calls had accumulated, so every rank holds the same gradients, as one rank
would have computed them (up to the order of float additions). Rank 0 gathers every rank's
outputs and metric sums (MessagePack, protocol/codec.py) and answers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from lathe.engine.batching import Part, co_batches
from lathe.engine.forward_backward import (
    Batching,
    Job,
    Pending,
    Resolved,
    finish,
    resolve,
    run_micro_batch,
)
from lathe.engine.group import Group
from lathe.models.document_attention import DocumentAttention
from lathe.models.layer_checkpoint import checkpointing
from lathe.models.lora import Adapter, RowGroup, use_adapters
from lathe.protocol import codec
from lathe.protocol import messages as m


def forward_backward(
    model: nn.Module, jobs: list[Job], how: Batching, group: Group
) -> list[m.ForwardBackwardResult]:
    """As engine/forward_backward.py's, with the datums split across the group's ranks.
    Rank 0 gets every request's result; the other ranks get theirs back empty."""
    shares = [share(jobs, rank, group.world) for rank in range(group.world)]
    batches = [co_batches([j.req.data for j in s], how.token_budget) for s in shares]
    mine, my_batches = shares[group.rank], batches[group.rank]
    backward = not jobs[0].req.forward_only
    adapters = distinct(j.adapter for j in jobs)
    earlier = set_aside_gradients(adapters) if backward else {}
    pending = [Pending(len(j.req.data)) for j in mine]
    for k in range(max(len(b) for b in batches)):
        long = any(k < len(b) and tokens(b[k]) > how.checkpoint_tokens for b in batches)
        if k < len(my_batches):
            run_micro_batch(model, mine, my_batches[k], how, pending, long)
        else:
            idle_pass(model, jobs[0].adapter, backward, long, how.deterministic)
    if backward:
        sum_gradients(adapters, earlier)
    everyone = gather(group, resolve(pending))
    if group.rank != 0:
        return [m.ForwardBackwardResult(outputs=[], metrics={}) for _ in jobs]
    merged = [merge([rank_results[j] for rank_results in everyone]) for j in range(len(jobs))]
    return finish(jobs, merged)


def share(jobs: list[Job], rank: int, world: int) -> list[Job]:
    """Rank `rank`'s contiguous run of each request's datums, the runs balanced by tokens."""
    out = []
    for job in jobs:
        data = job.req.data
        total = sum(len(d.tokens) for d in data)
        start, stop, seen = len(data), len(data), 0
        for i, d in enumerate(data):  # datum i goes to the rank its middle token falls in
            owner = min(world - 1, (2 * seen + len(d.tokens)) * world // max(2 * total, 1))
            if owner == rank:
                start = min(start, i)
                stop = i + 1
            seen += len(d.tokens)
        run = data[start:stop] if start < len(data) else []
        out.append(dataclasses.replace(job, req=dataclasses.replace(job.req, data=run)))
    return out


def tokens(parts: list[Part]) -> int:
    return sum(p.tokens for p in parts)


def distinct(adapters: Iterator[Adapter]) -> list[Adapter]:
    seen: dict[int, Adapter] = {}
    for a in adapters:
        seen.setdefault(id(a), a)
    return list(seen.values())


def idle_pass(
    model: nn.Module, adapter: Adapter, backward: bool, long: bool, deterministic: bool
) -> None:
    """The passes of a micro-batch with nothing in it: one token through the model with an
    adapter, so the backward pass reaches every layer (and its FSDP hooks), times zero. The
    adapter's gradients are left as they were (zeros added; none made where there were none)."""
    device = next(model.parameters()).device
    ids = torch.zeros((1, 1), dtype=torch.long, device=device)
    untouched = [t for t in adapter.parameters() if t.grad is None]
    with (
        torch.set_grad_enabled(backward),
        use_adapters([RowGroup(0, 1, adapter)], row_invariant=deterministic),
        checkpointing(long),
    ):
        hidden = model.hidden_states(ids, ids, DocumentAttention([1], deterministic))[0]
        if backward:
            (model.lm_head(hidden).sum() * 0.0).backward()
    for t in untouched:
        t.grad = None


def set_aside_gradients(adapters: list[Adapter]) -> dict[int, torch.Tensor]:
    """Take the gradients earlier calls accumulated off the adapters (by tensor id), so the
    all-reduce sums only this step's."""
    earlier = {}
    for adapter in adapters:
        for t in adapter.parameters():
            if t.grad is not None:
                earlier[id(t)] = t.grad
                t.grad = None
    return earlier


def sum_gradients(adapters: list[Adapter], earlier: dict[int, torch.Tensor]) -> None:
    """Sum this step's gradients over the ranks (one all-reduce), then add the earlier ones.
    A tensor gets a gradient if any rank computed one for it, as on one rank (torch's AdamW
    skips a tensor without one)."""
    tensors = [t for adapter in adapters for t in adapter.parameters()]
    computed = [float(t.grad is not None) for t in tensors]
    flat = torch.cat(
        [(t.grad if t.grad is not None else torch.zeros_like(t)).reshape(-1) for t in tensors]
        + [torch.tensor(computed, device=tensors[0].device)]
    )
    dist.all_reduce(flat)
    pieces = flat[: -len(tensors)].split([t.numel() for t in tensors])
    anywhere = flat[-len(tensors) :].tolist()  # the step's one wait for the all-reduce
    for t, piece, count in zip(tensors, pieces, anywhere, strict=True):
        new = piece.view_as(t).clone() if count > 0 else None
        before = earlier.get(id(t))
        if before is not None and new is not None:
            new = before + new
        t.grad = new if new is not None else before


def gather(group: Group, mine: list[Resolved]) -> list[list[Resolved]]:
    """Every rank's results, on rank 0 (rank order); elsewhere an empty list."""
    frames = group.gather_bytes(codec.encode_value(mine))
    return [codec.decode_value(f, list[Resolved]) for f in frames]


def merge(per_rank: list[Resolved]) -> Resolved:
    """One request's results from its runs on every rank: outputs in datum order (the runs are
    contiguous, in rank order), metric sums added in rank order."""
    outputs: list = []
    sums: dict[str, float] = {}
    for rank_outputs, rank_sums in per_rank:
        outputs += rank_outputs
        for k, v in rank_sums.items():
            sums[k] = sums.get(k, 0.0) + v
    return outputs, sums
