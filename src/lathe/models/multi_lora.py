"""Several adapters' LoRA deltas as one batched operation (the SGMV idea of Punica).

A co-batch's rows belong to several adapters, and some to none (base-model rows). Rather
than a matmul pair per adapter, the rows of every adapter that targets a module are gathered
into a padded block, one batch element per adapter (or a few, for an adapter with far more
rows than the others), and two batched matmuls against the
adapters' stacked A (G, r, in) and B^T (G, r, out) give all the deltas at once; `index_add`
adds them into the base output at their rows, out of place, so autograd still gives each
adapter the exact gradient of its own rows. Adapters of different ranks take one batched op
per rank (usually there is one). Base-model rows, and adapters that do not target the
module, take no part and cost nothing.

What is built when:
- per forward pass (`use_adapters`) and lazily: a RowPlan, and per set of adapters that
  target a module, its gather index and per-row scale (RowSet, models/lora_segments.py),
  shared by all modules; when every adapter is frozen, this layout is kept for the next
  passes with the same rows (SavedLayouts);
- per module call: stacks of trainable adapters (differentiable, so built every pass); the
  gathered input rows are shared by the modules that read the same input (q/k/v, gate/up);
- across passes: stacks of frozen adapters (sampler snapshots, which the decode steps reuse
  for many steps), in a small LRU cache keyed by the adapters' identities
  (models/lora_stacks.py).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lathe.models.lora_segments import RowSet, row_set
from lathe.models.lora_stacks import StackedSet, frozen_stacks, stack

if TYPE_CHECKING:
    from lathe.models.lora import Adapter, RowGroup

SAVED_LAYOUTS = 8  # row layouts of frozen-adapter passes kept for the next passes (LRU)


@dataclass
class Bucket:
    """Adapters of one rank that target a module, and where their rows are."""

    adapters: tuple[Adapter, ...]
    rows: RowSet
    _frozen: StackedSet | None = None  # their cache entry, looked up once per pass

    def __post_init__(self) -> None:
        # Frozen adapters (sampler snapshots) stay frozen; trainable ones stay trainable.
        self.trainable = any(t.requires_grad for ad in self.adapters for t in ad.parameters())

    def stacks(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A (G, r, in) and B^T (G, r, out) of the adapters for module `name`, in `dtype`."""
        if self.trainable:
            return stack(self.adapters, name, dtype)  # part of the graph: built every pass
        if self._frozen is None:
            self._frozen = frozen_stacks.entry(self.adapters)
        return frozen_stacks.get(self._frozen, name, dtype)


@dataclass
class Layout:
    """The plan for one batch size and device: adapters, their rows, and the lazy RowSets."""

    adapters: list[Adapter]  # distinct adapters with rows, in order of first appearance
    rows: list[list[int]]  # batch rows of each adapter
    block: int  # L is rounded up to a multiple of this (1: no rounding)
    device: torch.device
    sole: Adapter | None  # the one adapter of every row, when there is one
    _buckets: dict[str, list[Bucket]] = field(default_factory=dict)
    _bucket_of: dict[tuple[int, ...], Bucket] = field(default_factory=dict)  # by members
    _row_sets: dict[tuple[int, ...], RowSet] = field(default_factory=dict)
    _gathered: tuple[torch.Tensor, int, RowSet, torch.Tensor] | None = None

    def buckets(self, name: str) -> list[Bucket]:
        """The adapters that target module `name` and their rows: one bucket per rank."""
        got = self._buckets.get(name)
        if got is None:
            by_rank: dict[int, list[int]] = {}
            for i, adapter in enumerate(self.adapters):
                if name in adapter.a:
                    by_rank.setdefault(adapter.a[name].shape[0], []).append(i)
            got = [self.bucket(tuple(members)) for members in by_rank.values()]
            self._buckets[name] = got
        return got

    def bucket(self, members: tuple[int, ...]) -> Bucket:
        """One Bucket per set of adapters, shared by the modules they all target."""
        got = self._bucket_of.get(members)
        if got is None:
            adapters = tuple(self.adapters[i] for i in members)
            got = self._bucket_of[members] = Bucket(adapters, self.row_set(members))
        return got

    def row_set(self, members: tuple[int, ...]) -> RowSet:
        """Segments of adapters `members` (indices into `adapters`)."""
        got = self._row_sets.get(members)
        if got is None:
            rows = [self.rows[i] for i in members]
            scales = [self.adapters[i].config.scale for i in members]
            got = self._row_sets[members] = row_set(rows, scales, self.block, self.device)
        return got

    def gather(self, x: torch.Tensor, rs: RowSet) -> torch.Tensor:
        """x's rows in `rs`'s slots, (G, L, in); q/k/v (and gate/up) share one input, so the
        last gather is reused while x's memory, shape and contents are the same."""
        last = self._gathered
        if (
            last is not None
            and last[2] is rs
            and last[0].data_ptr() == x.data_ptr()  # last[0] is held: its memory is not reused
            and last[0].shape == x.shape
            and last[0].dtype == x.dtype
            and last[0].stride() == x.stride()
            and last[1] == x._version
        ):
            return last[3]
        xg = x.index_select(0, rs.index).view(*rs.shape, x.shape[1])
        self._gathered = (x, x._version, rs, xg)
        return xg

    def end_pass(self) -> None:
        """Let go of this pass's input and stack entries (a saved layout outlives it)."""
        self._gathered = None
        for bucket in self._bucket_of.values():
            bucket._frozen = None


class RowPlan:
    """The row-to-adapter assignment of one `use_adapters` block, laid out on first use."""

    def __init__(self, groups: tuple[RowGroup, ...], block: int) -> None:
        self.groups = groups
        self.block = block
        self._layouts: dict[tuple[int, torch.device], Layout] = {}

    def layout(self, num_rows: int, device: torch.device) -> Layout:
        got = self._layouts.get((num_rows, device))
        if got is None:
            got = saved_layouts.get(self.groups, self.block, num_rows, device)
            self._layouts[(num_rows, device)] = got
        return got

    def close(self) -> None:
        for layout in self._layouts.values():
            layout.end_pass()


def lay_out(
    groups: tuple[RowGroup, ...], block: int, num_rows: int, device: torch.device
) -> Layout:
    """Each adapter's rows (an adapter may have several groups), base rows left out."""
    adapters: list[Adapter] = []
    rows: list[list[int]] = []
    at_of: dict[int, int] = {}  # id(adapter) -> its index in `adapters`
    end, base_rows = 0, 0
    for g in groups:
        stop = num_rows if g.stop is None else g.stop
        assert g.start == end and stop >= g.start, "groups must tile the rows in order"
        end = stop
        if g.adapter is None:
            base_rows += stop - g.start
        elif stop > g.start:
            i = at_of.setdefault(id(g.adapter), len(adapters))
            if i == len(adapters):
                adapters.append(g.adapter)
                rows.append([])
            rows[i] += range(g.start, stop)
    assert end == num_rows or not groups, "groups must tile the rows in order"
    sole = adapters[0] if len(adapters) == 1 and base_rows == 0 else None
    return Layout(adapters, rows, block, device, sole)


class SavedLayouts:
    """Layouts of passes whose adapters are all frozen, kept for the passes that follow.

    The sampler's decode steps repeat one row assignment for many steps; a saved layout
    spares them re-planning rows and index tensors. Keyed by the groups' rows and adapter
    identities; the entry holds the groups (so the ids cannot be reused while it is kept)
    and is used only for those very adapters (`is`). Trainable adapters' layouts are not
    kept, so that a training model let go of is not held here.
    """

    def __init__(self, max_layouts: int = SAVED_LAYOUTS) -> None:
        self.max_layouts = max_layouts
        self._saved: OrderedDict[tuple, tuple[tuple[RowGroup, ...], Layout]] = OrderedDict()
        self._lock = threading.Lock()

    def get(
        self, groups: tuple[RowGroup, ...], block: int, num_rows: int, device: torch.device
    ) -> Layout:
        key = (block, num_rows, device, tuple((g.start, g.stop, id(g.adapter)) for g in groups))
        with self._lock:
            hit = self._saved.get(key)
            if hit is not None and all(
                a.adapter is b.adapter for a, b in zip(hit[0], groups, strict=True)
            ):
                self._saved.move_to_end(key)
                return hit[1]
        layout = lay_out(groups, block, num_rows, device)
        if not any(t.requires_grad for ad in layout.adapters for t in ad.parameters()):
            with self._lock:
                self._saved[key] = (groups, layout)
                while len(self._saved) > self.max_layouts:
                    self._saved.popitem(last=False)
        return layout

    def clear(self) -> None:
        with self._lock:
            self._saved.clear()


saved_layouts = SavedLayouts()


def add_deltas(y: torch.Tensor, x: torch.Tensor, layout: Layout, name: str) -> torch.Tensor:
    """y (M, out) plus every row's own adapter delta `x A^T B^T · scale`, for module `name`."""
    fresh = not torch.is_grad_enabled()  # without autograd y may be added to in place
    for bucket in layout.buckets(name):
        a, bt = bucket.stacks(name, x.dtype)  # (adapters, r, in), (adapters, r, out)
        rs = bucket.rows
        if rs.owner is not None:  # some adapters have several segments
            a, bt = a.index_select(0, rs.owner), bt.index_select(0, rs.owner)  # (G, ...)
        h = torch.bmm(layout.gather(x, rs), a.mT)  # (G, L, r)
        # Scaled in fp32 as a Python-float scale would be; the 0 on pad slots makes their
        # delta (and their share of the gradients) exactly zero.
        h = h * rs.scale if h.dtype == torch.float32 else (h.float() * rs.scale).to(h.dtype)
        d = torch.bmm(h, bt).view(-1, bt.shape[2])  # (G * L, out)
        y = y.index_add_(0, rs.index, d) if fresh else y.index_add(0, rs.index, d)
        fresh = True  # y is now a tensor of our own
    return y
