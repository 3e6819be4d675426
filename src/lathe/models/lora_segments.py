"""Where a batched LoRA delta's rows go: each adapter's batch rows as padded segments.

The batched matmuls of models/multi_lora.py take a (G, L, in) block: G segments of L rows,
each segment one adapter's. Padding every adapter to the largest one's row count is what
Punica's SGMV avoids with a kernel of its own; here an adapter with many more rows than the
others is cut into several segments instead, so that padding stays a small share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lathe.models.transfer import to_device


@dataclass(frozen=True)
class RowSet:
    """Where the rows of a tuple of adapters sit in the batch: G padded segments of L rows.

    Each adapter's rows fill one segment, or several when one adapter has many more rows
    than the others (so that the others are not all padded to its length).
    """

    index: torch.Tensor  # (G * L,) the batch row each slot holds; pad slots repeat a real row
    scale: torch.Tensor  # (G, L, 1) fp32: the adapter's alpha/rank on its rows, 0 on pad slots
    shape: tuple[int, int]  # (G, L)
    owner: torch.Tensor | None  # (G,) each segment's adapter; None: segment g is adapter g


MAX_WASTE = 0.25  # pad slots allowed (share of real rows) before big adapters are cut up


def segment_length(sizes: list[int], block: int) -> int:
    """Rows per segment for adapters with `sizes` rows, a multiple of `block`.

    The largest adapter's row count, unless padding every adapter to it wastes more than
    MAX_WASTE of the rows; then the length that pads least while cutting the adapters into
    at most twice as many segments (each extra segment copies its adapter's A and B).
    """
    up = lambda n: -(-n // block) * block  # noqa: E731
    total, longest = sum(sizes), up(max(sizes))
    if longest * len(sizes) <= total * (1 + MAX_WASTE):
        return longest
    best, best_slots = longest, longest * len(sizes)
    for k in range(2, 2 * len(sizes) + 1):  # k segments for the largest adapter
        L = up(-(-max(sizes) // k))
        segments = sum(-(-n // L) for n in sizes)
        if segments > 2 * len(sizes):
            break
        if segments * L < best_slots:
            best, best_slots = L, segments * L
    return best


def row_set(rows: list[list[int]], scales: list[float], block: int, device: torch.device) -> RowSet:
    """The segments of adapters with batch rows `rows` and LoRA scales `scales`."""
    L = segment_length([len(r) for r in rows], block)
    index: list[int] = []
    scale: list[float] = []
    owner: list[int] = []
    for g, (adapter_rows, sc) in enumerate(zip(rows, scales, strict=True)):
        for at in range(0, len(adapter_rows), L):
            seg = adapter_rows[at : at + L]
            index += seg + [seg[0]] * (L - len(seg))  # any real row: its delta is scaled by 0
            scale += [sc] * len(seg) + [0.0] * (L - len(seg))
            owner.append(g)
    G = len(owner)
    return RowSet(
        to_device(index, torch.long, device),
        to_device(scale, torch.float32, device).view(G, L, 1),
        (G, L),
        None if G == len(rows) else to_device(owner, torch.long, device),
    )
