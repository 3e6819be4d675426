"""The engine loop: the only code that runs the runner, on one thread of its own.

Work arrives through `submit` (from an engine client); the loop picks work with the
scheduler, executes it with the runner and puts each `Done` into `outbox`, which the client
drains on its own thread: turning results into protobuf or JSON and writing the database
happen there, never between engine steps. `step()` is the whole policy: schedule, execute,
update.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque

from lathe.engine.group import Group
from lathe.engine.runner import Runner
from lathe.engine.scheduler import CANCELLED, UNLOADED, Scheduler
from lathe.protocol import messages as m
from lathe.sampling.budget import pool_blocks

log = logging.getLogger(__name__)


LOST = (
    "the model was lost when the engine process restarted: its training state since the last "
    "save_state is gone; create a new training client from that checkpoint"
)


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
    def __init__(
        self,
        runner: Runner,
        lost_model_ids: list[str] | tuple[str, ...] = (),
        group: Group | None = None,
        group_facts: dict | None = None,
    ) -> None:
        self.runner = runner
        self.group = group  # rank 0 of an engine group: every step goes to the other ranks too
        self.group_facts = group_facts  # ranks and their shares of the base weights, for status
        self.scheduler = Scheduler(
            runner.training.token_budget, pool_blocks(runner.kv_budget_tokens)
        )
        self.scheduler.discard(list(lost_model_ids), reason=LOST)
        self.outbox: queue.Queue[m.Done] = queue.Queue()  # results, drained by the client
        self._inbox: queue.Queue[m.Work | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.paused_for_capacity: frozenset[str] = frozenset()  # sample requests waiting for KV
        self.status: dict = {}  # what GET /status shows
        self.rates = Rates()
        self._published_at = 0.0

    def submit(self, work: m.Work) -> None:
        """Thread-safe; called by the engine client."""
        self._inbox.put(work)

    def emit(self, done: m.Done) -> None:
        if done.request_id:  # internal work (unloading a session) is answered to nobody
            self.outbox.put(done)

    def step(self) -> bool:
        """Run one scheduled step; False when there was nothing to do."""
        step = self.scheduler.schedule()
        if not step:
            return False
        if self.group is not None:
            step = self.group.share(step)  # seeds drawn; every rank runs the same step
        result = self.runner.execute(step)
        dropped = self.scheduler.update(step, result.finished_samples)
        for done in result.done:
            self.emit(done)
        for work in dropped:  # waited for a model the step unloaded
            self.emit(m.Done(work.request_id, error=UNLOADED))
        self.rates.add("training", sum(training_tokens(w.request) for w in step.batch))
        self.rates.add("sampling", result.sampled_tokens)
        self.publish()
        return True

    def publish(self) -> None:
        """Facts the API reads from other threads (replaced whole, never mutated)."""
        self.paused_for_capacity = self.scheduler.paused_for_capacity
        now = time.monotonic()
        if now - self._published_at >= 0.5:  # the status is for people: twice a second is plenty
            self._published_at = now
            status = self.runner.status()
            status["sampling"]["waiting_requests"] = len(self.scheduler.paused_for_capacity)
            status["queued_by_tenant"] = self.scheduler.pending_by_tenant()
            status["tokens_per_second"] = self.rates.per_second(now)
            if self.group_facts is not None:
                status["group"] = self.group_facts
            self.status = status

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if item is None:
                    self._stopping = True
                elif (why := self.scheduler.unloaded(item)) is not None:
                    self.emit(m.Done(item.request_id, error=why))
                elif isinstance(item.request, m.CancelRequest):
                    self._cancel(item)
                else:
                    self.scheduler.submit(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _cancel(self, work: m.Work) -> None:
        """Queued samples are failed at once; running ones are stopped by the next step."""
        assert isinstance(work.request, m.CancelRequest)
        queued, running = self.scheduler.cancel(work.request.request_ids)
        for dropped in queued:
            self.emit(m.Done(dropped.request_id, error=CANCELLED))
        if running:
            self.scheduler.submit(m.Work("", m.CancelRequest(running), tenant=work.tenant))

    def _run(self) -> None:
        while not self._stopping:
            self._drain(block=False)
            if not self.step():
                self.publish()  # the status stays fresh while idle
                self._drain(block=True)
        if self.group is not None:
            self.group.stop()  # from this thread: the group's messages keep their order

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lathe-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
