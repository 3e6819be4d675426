"""The scheduler decides what runs next. Pure policy: no torch, testable with plain messages.

Rules:
- A training model's requests run strictly in `seq_id` order. Its creation (create_model or
  create-via-load) is its seq 0; the client's requests follow from 1. A request whose seq id
  is ahead of the next expected one waits, however it arrived (the SDK posts the chunks of
  one call concurrently, so they arrive out of order).
- Requests without an order (sampling, sampler creation) are ready as soon as they arrive.
- Fairness between tenants (users): among ready requests, the tenant that has been served the
  fewest tokens goes first (start-time fair queuing: a tenant that becomes active starts at
  the level of the least-served active tenant, so idle time is not banked). A tenant flooding
  the queue gets its share, not the whole server. Ties go to the earliest arrival, so
  training and sampling of one tenant interleave.
- Co-batching: when a forward/forward_backward request is picked, ready ones of other models
  on the same base model (and the same forward-only mode) join it, in the same fair order,
  up to the token budget. Each model still contributes at most its next seq id.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from lathe.protocol import messages as m


@dataclass(frozen=True)
class Queued:
    arrival: int  # global arrival counter, for first-come-first-served among equals
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


def cost(req: m.Request) -> int:
    """Tokens of work a request stands for (what fairness counts)."""
    match req:
        case m.ForwardBackwardRequest():
            return sum(len(d.tokens) for d in req.data)
        case m.SampleRequest():
            return len(req.prompt) + req.num_samples * req.params.max_tokens
    return 1


def co_batchable(req: m.Request) -> bool:
    return isinstance(req, m.ForwardBackwardRequest) and req.custom_loss is None


class Scheduler:
    def __init__(self, token_budget: int = 16384) -> None:
        self.token_budget = token_budget  # tokens of one co-batch
        self._arrivals = itertools.count()
        self._by_model: dict[str, dict[int, Queued]] = {}  # model_id -> seq_id -> work
        self._next_seq: dict[str, int] = {}  # model_id -> the seq id allowed to run next
        self._unordered: list[Queued] = []
        self._served: dict[str, float] = {}  # tenant -> tokens served (its virtual time)
        self._unloaded: set[str] = set()  # models whose session ended: nothing waits for them

    def _queued(self) -> list[Queued]:
        return [q for queue in self._by_model.values() for q in queue.values()] + self._unordered

    def submit(self, work: m.Work) -> None:
        active = {q.work.tenant for q in self._queued()}
        if work.tenant not in active:  # (re)joining: start at the least-served active level
            floor = min((self._served.get(t, 0.0) for t in active), default=0.0)
            self._served[work.tenant] = max(self._served.get(work.tenant, 0.0), floor)
        queued = Queued(next(self._arrivals), work)
        key = ordering_key(work.request)
        if key is None:
            self._unordered.append(queued)
            return
        model_id, seq = key
        if seq == 0:
            self._next_seq[model_id] = 0
        self._by_model.setdefault(model_id, {})[seq] = queued

    def _ready(self) -> list[Queued]:
        ready = [
            q
            for model_id, queue in self._by_model.items()
            if (q := queue.get(self._next_seq.get(model_id, -1))) is not None
        ]
        return ready + self._unordered

    def _order(self, q: Queued) -> tuple[float, int]:
        return self._served.get(q.work.tenant, 0.0), q.arrival

    def schedule(self) -> list[m.Work]:
        """The next batch to run (empty when nothing is ready)."""
        ready = sorted(self._ready(), key=self._order)
        if not ready:
            return []
        first = ready[0].work
        batch = [first]
        if co_batchable(first.request):
            head = first.request
            tokens = cost(head)
            for q in ready[1:]:
                req = q.work.request
                if (
                    co_batchable(req)
                    and req.base_model == head.base_model
                    and req.forward_only == head.forward_only
                    and tokens + cost(req) <= self.token_budget
                ):
                    batch.append(q.work)
                    tokens += cost(req)
        return batch

    def update(self, batch: list[m.Work]) -> None:
        """Mark a batch as executed: its models may move on to their next seq id."""
        for work in batch:
            self._served[work.tenant] = self._served.get(work.tenant, 0.0) + cost(work.request)
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

    def discard(self, model_ids: list[str]) -> list[m.Work]:
        """Forget unloaded models: their queued work (waiting on a seq id that will never come,
        say) is returned so that its futures can be failed rather than left pending forever."""
        dropped = []
        for model_id in model_ids:
            dropped += [q.work for q in self._by_model.pop(model_id, {}).values()]
            self._next_seq.pop(model_id, None)
            self._unloaded.add(model_id)
        return dropped

    def unloaded(self, work: m.Work) -> bool:
        """Whether the work is for a model already unloaded (it would wait forever)."""
        key = ordering_key(work.request)
        return key is not None and key[0] in self._unloaded

    def pending(self) -> int:
        return len(self._unordered) + sum(len(q) for q in self._by_model.values())

    def pending_by_tenant(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for q in self._queued():
            counts[q.work.tenant] = counts.get(q.work.tenant, 0) + 1
        return counts

    def waiting_models(self) -> dict[str, list[int]]:
        """Models with queued work that cannot run yet, and the seq ids they hold."""
        return {
            model_id: sorted(queue)
            for model_id, queue in self._by_model.items()
            if self._next_seq.get(model_id, -1) not in queue
        }
