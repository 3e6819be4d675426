"""The scheduler decides what runs next. Pure policy: no torch, testable with plain messages.

Rules:
- A training model's requests run strictly in `seq_id` order. Its creation (create_model or
  create-via-load) is its seq 0; the client's requests follow from 1. A request whose seq id
  is ahead of the next expected one waits, however it arrived (the SDK posts the chunks of
  one call concurrently, so they arrive out of order).
- Requests without an order (sampling, sampler creation) are ready as soon as they arrive.
- Among ready requests the oldest arrival goes first, so training and sampling interleave
  and neither starves the other.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from lathe.engine import messages as m


@dataclass(frozen=True)
class Queued:
    arrival: int  # global arrival counter, for first-come-first-served among ready work
    work: m.Work


def ordering_key(req: m.Request) -> tuple[str, int] | None:
    """(model_id, seq_id) for requests that must run in a model's order; None otherwise."""
    match req:
        case m.CreateModelRequest():
            return req.model_id, 0
        case m.LoadRequest():
            return req.model_id, 0 if req.create else req.seq_id
        case (
            m.ForwardBackwardRequest()
            | m.OptimStepRequest()
            | m.SaveRequest()
            | m.SnapshotRequest()
            | m.SkipRequest()
        ):
            return req.model_id, req.seq_id
    return None


class Scheduler:
    def __init__(self) -> None:
        self._arrivals = itertools.count()
        self._by_model: dict[str, dict[int, Queued]] = {}  # model_id -> seq_id -> work
        self._next_seq: dict[str, int] = {}  # model_id -> the seq id allowed to run next
        self._unordered: list[Queued] = []

    def submit(self, work: m.Work) -> None:
        queued = Queued(next(self._arrivals), work)
        key = ordering_key(work.request)
        if key is None:
            self._unordered.append(queued)
            return
        model_id, seq = key
        if seq == 0:
            self._next_seq[model_id] = 0
        self._by_model.setdefault(model_id, {})[seq] = queued

    def schedule(self) -> list[m.Work]:
        """The next batch to run (empty when nothing is ready)."""
        ready = [
            q
            for model_id, queue in self._by_model.items()
            if (q := queue.get(self._next_seq.get(model_id, -1))) is not None
        ]
        if self._unordered:
            ready.append(self._unordered[0])
        if not ready:
            return []
        return [min(ready, key=lambda q: q.arrival).work]

    def update(self, batch: list[m.Work]) -> None:
        """Mark a batch as executed: its models may move on to their next seq id."""
        for work in batch:
            key = ordering_key(work.request)
            if key is None:
                self._unordered = [q for q in self._unordered if q.work is not work]
                continue
            model_id, seq = key
            queue = self._by_model[model_id]
            del queue[seq]
            if not queue:
                del self._by_model[model_id]
            self._next_seq[model_id] = seq + 1

    def pending(self) -> int:
        return len(self._unordered) + sum(len(q) for q in self._by_model.values())

    def waiting_models(self) -> dict[str, list[int]]:
        """Models with queued work that cannot run yet, and the seq ids they hold."""
        return {
            model_id: sorted(queue)
            for model_id, queue in self._by_model.items()
            if self._next_seq.get(model_id, -1) not in queue
        }
