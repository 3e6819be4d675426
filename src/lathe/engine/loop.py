"""The engine loop: the only code that runs the runner, on one thread of its own.

HTTP handlers `submit` work and return at once; the loop picks work with the scheduler,
executes it with the runner and hands each `Done` to the callback (which completes futures).
`step()` is the whole policy: schedule, execute, update.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable

from lathe.engine.runner import Runner
from lathe.engine.scheduler import Scheduler
from lathe.protocol import messages as m

log = logging.getLogger(__name__)


UNLOADED = "the model was unloaded (its session ended) before this request ran"


def training_tokens(req: m.Request) -> int:
    if isinstance(req, m.ForwardBackwardRequest):
        return sum(len(d.tokens) for d in req.data)
    return 0


class Rates:
    """Tokens per second of training and sampling over the last WINDOW seconds."""

    WINDOW = 60.0

    def __init__(self) -> None:
        self.events: deque[tuple[float, str, int]] = deque()

    def add(self, kind: str, tokens: int) -> None:
        if tokens:
            self.events.append((time.monotonic(), kind, tokens))

    def per_second(self, now: float) -> dict[str, float]:
        while self.events and self.events[0][0] < now - self.WINDOW:
            self.events.popleft()
        totals = {"training": 0, "sampling": 0}
        for _, kind, tokens in self.events:
            totals[kind] += tokens
        return {k: round(v / self.WINDOW, 1) for k, v in totals.items()}


class Engine:
    def __init__(self, runner: Runner, on_done: Callable[[m.Done], None]) -> None:
        self.runner = runner
        self.scheduler = Scheduler(runner.token_budget)
        self.on_done = on_done
        self._inbox: queue.Queue[m.Work | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.paused_for_capacity: frozenset[str] = frozenset()  # sample requests waiting for KV
        self.status: dict = {}  # what GET /status shows
        self.rates = Rates()
        self._published_at = 0.0

    def submit(self, work: m.Work) -> None:
        """Thread-safe; called from HTTP handlers."""
        self._inbox.put(work)

    def step(self) -> bool:
        """Run one scheduled batch and one sampling step; False when there was nothing to do.

        Alternating the two keeps training and sampling both moving.
        """
        did = False
        batch = self.scheduler.schedule()
        if batch:
            if len(batch) > 1:  # forward/forward_backward of several models, co-batched
                results = self.runner.execute_co_batch(batch)
            else:
                results = [self.runner.execute(batch[0])]
            self.rates.add("training", sum(training_tokens(w.request) for w in batch))
            self.scheduler.update(batch)
            for done in results:
                if done is not None:  # sampling requests finish in later sampling steps
                    self.on_done(done)
            if isinstance(batch[0].request, m.UnloadRequest):
                for work in self.scheduler.discard(batch[0].request.model_ids):
                    self.on_done(m.Done(work.request_id, error=UNLOADED))
            did = True
        if self.runner.sampling.has_work():
            before = self.runner.sampling.tokens_sampled
            self.runner.sampling_step(self.on_done)
            self.rates.add("sampling", self.runner.sampling.tokens_sampled - before)
            did = True
        self.publish()
        return did

    def publish(self) -> None:
        """Facts the API reads from other threads (replaced whole, never mutated)."""
        self.paused_for_capacity = frozenset(self.runner.sampling.waiting_ids())
        now = time.monotonic()
        if now - self._published_at >= 0.5:  # the status is for people: twice a second is plenty
            self._published_at = now
            self.status = self.runner.status() | {
                "queued_by_tenant": self.scheduler.pending_by_tenant(),
                "tokens_per_second": self.rates.per_second(now),
            }

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if item is None:
                    self._stopping = True
                elif self.scheduler.unloaded(item):
                    self.on_done(m.Done(item.request_id, error=UNLOADED))
                else:
                    self.scheduler.submit(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _run(self) -> None:
        while not self._stopping:
            self._drain(block=False)
            if not self.step():
                self._drain(block=True)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lathe-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
