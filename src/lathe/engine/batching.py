"""Turning a list of datums into padded tensors, with little padding.

How a batch is packed: each datum is padded to its own length rounded up to a multiple of
PAD_MULTIPLE (at most 15 wasted tokens each), datums of the same padded length are batched
together, and groups are cut so a micro-batch holds at most a token budget (which bounds
activation memory). So a batch mixing 10- and 1000-token datums never pads the short ones to
1000, and a datum's padded shape depends on nothing but itself: the same datum gives the same
numbers whichever batch or chunk it comes in (up to the batch size's effect on float
rounding). Micro-batches run one after another and their gradients add up, which is exactly
the gradient of the whole batch because every loss is a sum over tokens. With causal
attention, real tokens never attend to the padding that follows them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from lathe.protocol.messages import Datum


@dataclass(frozen=True)
class PaddedBatch:
    ids: torch.Tensor  # (B, T) input token ids
    targets: torch.Tensor  # (B, T, K) target ids; K = 1 for one target per position
    inputs: dict[str, torch.Tensor]  # float inputs, (B, T, K) like targets
    mask: torch.Tensor  # (B, T, 1): 1.0 on real positions
    lengths: list[int]  # real length of each row
    widths: list[int]  # targets per position of each row (K of its own (N, K) targets)
    two_d: bool  # targets were (N, K) rather than (N,)

    def rows(self, start: int, stop: int) -> PaddedBatch:
        """Rows [start, stop) of the batch (views of the same tensors)."""
        return PaddedBatch(
            ids=self.ids[start:stop],
            targets=self.targets[start:stop],
            inputs={k: v[start:stop] for k, v in self.inputs.items()},
            mask=self.mask[start:stop],
            lengths=self.lengths[start:stop],
            widths=self.widths[start:stop],
            two_d=self.two_d,
        )


PAD_MULTIPLE = 16


@dataclass(frozen=True)
class Part:
    """One request's micro-batch: its datums `rows` (indices into its data), one padded length."""

    job: int  # index of the request
    length: int  # padded length of every datum in it
    rows: list[int]
    two_d: bool  # (N, K) targets

    @property
    def tokens(self) -> int:
        return self.length * len(self.rows)


def co_batches(jobs: list[list[Datum]], token_budget: int) -> list[list[Part]]:
    """Micro-batches for several requests at once (different adapters of one base model).

    Each request is cut into micro-batches exactly as if it ran alone (`length_groups`), and
    those of equal padded length from different requests are merged while the budget allows,
    each request's parts kept in their own order. So a request's rows, their shapes and the
    order its gradients accumulate in are the same alone or co-batched.
    """
    queues = []
    for j, data in enumerate(jobs):
        parts = []
        for rows in length_groups(data, token_budget):
            d = data[rows[0]]
            parts.append(
                Part(
                    j, padded_length(len(d.tokens)), rows, d.loss_inputs["target_tokens"].ndim == 2
                )
            )
        queues.append(deque(parts))
    batches = []
    while any(queues):
        head = next(q for q in queues if q).popleft()
        batch, tokens = [head], head.tokens
        for q in queues:
            if (
                q
                and (q[0].length, q[0].two_d) == (head.length, head.two_d)
                and (tokens + q[0].tokens <= token_budget)
                and q[0].job != head.job
            ):
                part = q.popleft()
                batch.append(part)
                tokens += part.tokens
        batches.append(sorted(batch, key=lambda p: p.job))
    return batches


def padded_length(n: int) -> int:
    return -(-n // PAD_MULTIPLE) * PAD_MULTIPLE


def length_groups(data: list[Datum], token_budget: int) -> list[list[int]]:
    """Indices of `data` in micro-batches of one padded length, within the budget if they can."""
    by_length: dict[int, list[int]] = {}
    for i, d in enumerate(data):
        by_length.setdefault(padded_length(len(d.tokens)), []).append(i)
    groups = []
    for length in sorted(by_length, reverse=True):
        per_batch = max(1, token_budget // length)
        members = by_length[length]
        groups += [members[j : j + per_batch] for j in range(0, len(members), per_batch)]
    return groups


def pad(data: list[Datum], fill: dict[str, float | None], device: torch.device) -> PaddedBatch:
    """Right-pad datums into tensors.

    `fill` names the per-token float inputs to carry, with the value an absent one takes
    (None: leave it out); other loss_fn_inputs are not padded.
    """
    B = len(data)
    T = max(padded_length(len(d.tokens)) for d in data)
    two_d = data[0].loss_inputs["target_tokens"].ndim == 2
    K = max(d.loss_inputs["target_tokens"].shape[1] for d in data) if two_d else 1
    ids = torch.zeros(B, T, dtype=torch.long)
    targets = torch.zeros(B, T, K, dtype=torch.long)
    mask = torch.zeros(B, T, 1)
    sent = {k for d in data for k in d.loss_inputs}
    names = {k for k, v in fill.items() if k in sent or v is not None}
    inputs = {k: torch.zeros(B, T, K) for k in names}
    for i, d in enumerate(data):
        n = len(d.tokens)
        ids[i, :n] = torch.tensor(d.tokens)
        t = d.loss_inputs["target_tokens"].astype(np.int64).reshape(n, -1)
        k_i = t.shape[1]  # this datum's targets per position; extra columns stay weight 0
        targets[i, :n, :k_i] = torch.from_numpy(t)
        mask[i, :n] = 1.0
        for k in names:
            if k in d.loss_inputs:
                v = d.loss_inputs[k].astype(np.float32).reshape(n, -1)
                inputs[k][i, :n, :k_i] = torch.from_numpy(v)
            else:
                inputs[k][i, :n, :k_i] = fill[k]  # type: ignore[assignment]
    return PaddedBatch(
        ids=ids.to(device),
        targets=targets.to(device),
        inputs={k: v.to(device) for k, v in inputs.items()},
        mask=mask.to(device),
        lengths=[len(d.tokens) for d in data],
        widths=[d.loss_inputs["target_tokens"].reshape(len(d.tokens), -1).shape[1] for d in data],
        two_d=two_d,
    )
