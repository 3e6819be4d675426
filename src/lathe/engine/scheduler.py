"""The scheduler decides what runs next. Pure policy: no torch, testable with plain messages.

Rules:
- A training model's requests run strictly in `seq_id` order. Its creation (create_model or
  create-via-load) is its seq 0; the client's requests follow from 1. A request whose seq id
  is ahead of the next expected one waits, however it arrived (the SDK posts the chunks of
  one call concurrently, so they arrive out of order).
- Requests without an order (sampler creation, checks) are ready as soon as they arrive.
- Sampling: every step admits the waiting sample requests whose KV blocks fit their base
  model's budget (`sampling/budget.py` counts them), in the fair order below, and reserves the
  blocks until the request finishes. Per base model, admission stops at the first request that
  does not fit (a big request is not overtaken forever); one that could never fit is refused.
  Admitted requests are prefilled and decoded by the step's sampling pass, alongside the
  training batch, so neither training nor sampling waits for the other.
- Fairness between tenants (users): among ready requests, the tenant that has been served the
  fewest tokens goes first (start-time fair queuing: a tenant that becomes active starts at
  the level of the least-served active tenant, so idle time is not banked). A tenant flooding
  the queue gets its share, not the whole server. Ties go to the earliest arrival, so
  training and sampling of one tenant interleave.
- Co-batching: when a forward/forward_backward request is picked, ready ones of other models
  on the same base model (and the same forward-only mode) join it, in the same fair order,
  up to the token budget. Each model still contributes at most its next seq id.
- optim_steps go first, all that are ready in one step: each is cheap (it counts as one
  token for fairness) and its model's next forward_backward waits on it. Run as soon as they
  are ready, the tenants of a co-batch are all ready again together and their next steps
  co-batch whole; left to the fair order, the tenants split into groups that alternate,
  each co-batching only with itself.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from lathe.protocol import messages as m
from lathe.sampling.budget import BLOCK, blocks_needed


@dataclass(frozen=True)
class Queued:
    arrival: int  # global arrival counter, for first-come-first-served among equals
    work: m.Work


@dataclass
class Step:
    """What one engine step does, in this order."""

    # training/control work: one request, a co-batch of forward(_backward)s, or optim_steps
    batch: list[m.Work] = field(default_factory=list)
    refuse: list[tuple[m.Work, str]] = field(default_factory=list)  # can never run: the reason
    admit: list[m.Work] = field(default_factory=list)  # sample requests that start now
    decode: bool = False  # run one sampling pass (prefill chunks and a token per sequence)

    def __bool__(self) -> bool:
        return bool(self.batch or self.refuse or self.admit or self.decode)


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


UNLOADED = "the model was unloaded (its session ended) before this request ran"
CANCELLED = "the client cancelled this request"


def co_batchable(req: m.Request) -> bool:
    return isinstance(req, m.ForwardBackwardRequest) and req.custom_loss is None


class Scheduler:
    def __init__(self, token_budget: int = 16384, kv_blocks: int = 1 << 30) -> None:
        self.token_budget = token_budget  # tokens of one co-batch
        self.kv_blocks = kv_blocks  # KV blocks of each base model's pool
        self._samples: list[Queued] = []  # sample requests waiting for admission
        self._running: dict[str, tuple[str, int]] = {}  # admitted: request -> (base, blocks)
        self._reserved: dict[str, int] = {}  # base model -> blocks reserved by running requests
        self.paused_for_capacity: frozenset[str] = frozenset()  # waiting for KV blocks
        self._arrivals = itertools.count()
        self._by_model: dict[str, dict[int, Queued]] = {}  # model_id -> seq_id -> work
        self._next_seq: dict[str, int] = {}  # model_id -> the seq id allowed to run next
        self._unordered: list[Queued] = []
        self._served: dict[str, float] = {}  # tenant -> tokens served (its virtual time)
        self._unloaded: dict[str, str] = {}  # model -> why it is gone: nothing waits for it

    def _queued(self) -> list[Queued]:
        queued = [q for queue in self._by_model.values() for q in queue.values()]
        return queued + self._unordered + self._samples

    def submit(self, work: m.Work) -> None:
        active = {q.work.tenant for q in self._queued()}
        if work.tenant not in active:  # (re)joining: start at the least-served active level
            floor = min((self._served.get(t, 0.0) for t in active), default=0.0)
            self._served[work.tenant] = max(self._served.get(work.tenant, 0.0), floor)
        queued = Queued(next(self._arrivals), work)
        key = ordering_key(work.request)
        if isinstance(work.request, m.SampleRequest):
            self._samples.append(queued)
            return
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

    def schedule(self) -> Step:
        """What the next step runs (falsy when there is nothing to do)."""
        step = Step(batch=self._training_batch())
        self._admission(step)
        step.decode = bool(self._running or step.admit)
        return step

    def _training_batch(self) -> list[m.Work]:
        ready = sorted(self._ready(), key=self._order)
        if not ready:
            return []
        optim_steps = [q.work for q in ready if isinstance(q.work.request, m.OptimStepRequest)]
        if optim_steps:
            return optim_steps
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

    def _admission(self, step: Step) -> None:
        reserved = dict(self._reserved)
        full: set[str] = set()  # base models where a request already waits
        paused = set()
        for q in sorted(self._samples, key=self._order):
            req = q.work.request
            assert isinstance(req, m.SampleRequest)
            need = blocks_needed(req)
            if need > self.kv_blocks:
                why = (
                    f"the request needs {need * BLOCK} KV positions; this server holds "
                    f"{self.kv_blocks * BLOCK} per base model"
                )
                step.refuse.append((q.work, why))
            elif req.base_model not in full and reserved.get(req.base_model, 0) + need <= (
                self.kv_blocks
            ):
                reserved[req.base_model] = reserved.get(req.base_model, 0) + need
                step.admit.append(q.work)
            else:
                full.add(req.base_model)
                paused.add(q.work.request_id)
        self.paused_for_capacity = frozenset(paused)

    def update(self, step: Step, finished_samples: Sequence[str] = ()) -> list[m.Work]:
        """Mark a step as executed: its models may move on to their next seq id, admitted
        samples hold their KV blocks until they are among `finished_samples`. Returns the work
        that waited for models the step unloaded (to be failed)."""
        for work in step.batch:
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
        gone = {id(w) for w in step.admit} | {id(w) for w, _ in step.refuse}
        self._samples = [q for q in self._samples if id(q.work) not in gone]
        for work in step.admit:
            req = work.request
            assert isinstance(req, m.SampleRequest)
            self._served[work.tenant] = self._served.get(work.tenant, 0.0) + cost(req)
            need = blocks_needed(req)
            self._running[work.request_id] = (req.base_model, need)
            self._reserved[req.base_model] = self._reserved.get(req.base_model, 0) + need
        for request_id in finished_samples:
            if (held := self._running.pop(request_id, None)) is not None:
                self._reserved[held[0]] -= held[1]
        if step.batch and isinstance(step.batch[0].request, m.UnloadRequest):
            return self.discard(step.batch[0].request.model_ids, UNLOADED)
        return []

    def cancel(self, request_ids: list[str]) -> tuple[list[m.Work], list[str]]:
        """Abandoned sample requests: the queued ones leave the queue (returned, to be failed);
        the ids of the running ones are returned for the runner to stop."""
        wanted = set(request_ids)
        queued = [q.work for q in self._samples if q.work.request_id in wanted]
        self._samples = [q for q in self._samples if q.work.request_id not in wanted]
        running = [rid for rid in request_ids if rid in self._running]
        return queued, running

    def discard(self, model_ids: list[str], reason: str) -> list[m.Work]:
        """Forget unloaded models: their queued work (waiting on a seq id that will never come,
        say) is returned so that its futures can be failed rather than left pending forever.
        Work for them that arrives later is refused with `reason`."""
        dropped = []
        for model_id in model_ids:
            dropped += [q.work for q in self._by_model.pop(model_id, {}).values()]
            self._next_seq.pop(model_id, None)
            self._unloaded[model_id] = reason
        return dropped

    def unloaded(self, work: m.Work) -> str | None:
        """Why the work's model is gone (it would wait forever), or None if it is not."""
        key = ordering_key(work.request)
        return None if key is None else self._unloaded.get(key[0])

    def pending(self) -> int:
        queued = len(self._unordered) + len(self._samples)
        return queued + sum(len(q) for q in self._by_model.values())

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
