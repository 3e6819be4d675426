"""Turning a list of datums into micro-batches: packed for the model, padded for the losses.

A micro-batch's datums, whatever their lengths and whichever requests (adapters) they come
from, are packed end to end into one token stream (`Stream`): the model runs its matmuls
over exactly the real tokens, and attention keeps each datum to itself
(models/document_attention.py). So a co-batch costs what its real tokens cost, and a batch
mixing 10- and 1000-token datums pads nothing. The losses, which are cheap, see the same
datums right-padded to (B, T) (`PaddedBatch`).

Each request is cut into micro-batches of at most a token budget (which bounds activation
memory) exactly as if it ran alone (`packs`); micro-batches of several requests merge while
the budget allows. So a request's datums, and the order its gradients accumulate in, are the
same alone or co-batched. Micro-batches run one after another and their gradients add up,
which is exactly the gradient of the whole batch because every loss is a sum over tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from lathe.models.transfer import to_device
from lathe.protocol.messages import Datum


@dataclass(frozen=True)
class PaddedBatch:
    targets: torch.Tensor  # (B, T, K) target ids; K = 1 for one target per position
    inputs: dict[str, torch.Tensor]  # float inputs, (B, T, K) like targets
    mask: torch.Tensor  # (B, T, 1): 1.0 on real positions
    lengths: list[int]  # real length of each row
    widths: list[int]  # targets per position of each row (K of its own (N, K) targets)
    two_d: bool  # targets were (N, K) rather than (N,)

    def rows(self, start: int, stop: int) -> PaddedBatch:
        """Rows [start, stop) of the batch (views of the same tensors), cut to their own
        longest length and widest targets: the layout they would have padded on their own,
        so sums over them do not depend on what else is in the batch."""
        t = max(self.lengths[start:stop])
        k = max(self.widths[start:stop]) if self.two_d else 1
        return PaddedBatch(
            targets=self.targets[start:stop, :t, :k],
            inputs={name: v[start:stop, :t, :k] for name, v in self.inputs.items()},
            mask=self.mask[start:stop, :t],
            lengths=self.lengths[start:stop],
            widths=self.widths[start:stop],
            two_d=self.two_d,
        )


@dataclass(frozen=True)
class Stream:
    """A micro-batch's datums end to end, as the model runs them."""

    ids: torch.Tensor  # (1, N) token ids of every datum, one after another
    positions: torch.Tensor  # (1, N) each token's position within its own datum
    lengths: list[int]  # tokens of each datum, in stream order


def stream(data: list[Datum], device: torch.device) -> Stream:
    ids = np.concatenate([np.asarray(d.tokens, dtype=np.int64) for d in data])
    positions = np.concatenate([np.arange(len(d.tokens)) for d in data])
    return Stream(
        to_device(ids[None], torch.long, device),
        to_device(positions[None], torch.long, device),
        [len(d.tokens) for d in data],
    )


@dataclass(frozen=True)
class Part:
    """One request's share of a micro-batch: its datums `rows` (indices into its data)."""

    job: int  # index of the request
    tokens: int  # real tokens of its datums
    rows: list[int]
    two_d: bool  # (N, K) targets


def co_batches(jobs: list[list[Datum]], token_budget: int) -> list[list[Part]]:
    """Micro-batches for several requests at once (different adapters of one base model).

    Each request is cut into micro-batches exactly as if it ran alone (`packs`), and those of
    different requests are merged while the budget allows, each request's parts kept in their
    own order.
    """
    queues = []
    for j, data in enumerate(jobs):
        parts = [
            Part(
                j,
                sum(len(data[i].tokens) for i in rows),
                rows,
                data[rows[0]].loss_inputs["target_tokens"].ndim == 2,
            )
            for rows in packs(data, token_budget)
        ]
        queues.append(deque(parts))
    batches = []
    while any(queues):
        head = next(q for q in queues if q).popleft()
        batch, tokens = [head], head.tokens
        for q in queues:
            if (
                q
                and q[0].two_d == head.two_d
                and (tokens + q[0].tokens <= token_budget)
                and q[0].job != head.job
            ):
                part = q.popleft()
                batch.append(part)
                tokens += part.tokens
        batches.append(sorted(batch, key=lambda p: p.job))
    return batches


def packs(data: list[Datum], token_budget: int) -> list[list[int]]:
    """Indices of `data`, in order, cut into micro-batches of at most `token_budget` tokens
    (a datum longer than the budget is a micro-batch of its own)."""
    groups: list[list[int]] = []
    tokens = token_budget + 1  # the first datum starts a group
    for i, d in enumerate(data):
        n = len(d.tokens)
        if tokens + n > token_budget:
            groups.append([])
            tokens = 0
        groups[-1].append(i)
        tokens += n
    return groups


def pad(data: list[Datum], fill: dict[str, float | None], device: torch.device) -> PaddedBatch:
    """Right-pad datums into (B, T) tensors, T the longest datum's length.

    `fill` names the per-token float inputs to carry, with the value an absent one takes
    (None: leave it out); other loss_fn_inputs are not padded.
    """
    B = len(data)
    T = max(len(d.tokens) for d in data)
    two_d = data[0].loss_inputs["target_tokens"].ndim == 2
    K = max(d.loss_inputs["target_tokens"].shape[1] for d in data) if two_d else 1
    targets = np.zeros((B, T, K), dtype=np.int64)
    mask = np.zeros((B, T, 1), dtype=np.float32)
    sent = {k for d in data for k in d.loss_inputs}
    names = {k for k, v in fill.items() if k in sent or v is not None}
    inputs = {k: np.zeros((B, T, K), dtype=np.float32) for k in names}
    for i, d in enumerate(data):
        n = len(d.tokens)
        t = d.loss_inputs["target_tokens"].astype(np.int64).reshape(n, -1)
        k_i = t.shape[1]  # this datum's targets per position; extra columns stay weight 0
        targets[i, :n, :k_i] = t
        mask[i, :n] = 1.0
        for k in names:
            if k in d.loss_inputs:
                inputs[k][i, :n, :k_i] = d.loss_inputs[k].astype(np.float32).reshape(n, -1)
            else:
                inputs[k][i, :n, :k_i] = fill[k]
    return PaddedBatch(
        targets=to_device(targets, torch.long, device),
        inputs={k: to_device(v, torch.float32, device) for k, v in inputs.items()},
        mask=to_device(mask, torch.float32, device),
        lengths=[len(d.tokens) for d in data],
        widths=[d.loss_inputs["target_tokens"].reshape(len(d.tokens), -1).shape[1] for d in data],
        two_d=two_d,
    )
