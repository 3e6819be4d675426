"""The interface between the API and the engine, and what both clients share."""

from __future__ import annotations

import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from lathe.protocol import messages as m

OnDone = Callable[[m.Done], None]


class EngineClient(ABC):
    """Work goes in with `submit`; each result comes back once, to the `on_done` handler given
    to `start`, on the client's own thread (never the engine's)."""

    def __init__(self) -> None:
        self._on_done: OnDone = lambda done: None
        self._waiters: dict[str, tuple[threading.Event, list[m.Done]]] = {}
        self._lock = threading.Lock()

    @abstractmethod
    def start(self, on_done: OnDone) -> None:
        """Start the engine; returns when it is ready for work."""

    @abstractmethod
    def submit(self, work: m.Work) -> None:
        """Hand work to the engine; never blocks on it."""

    @abstractmethod
    def status(self) -> dict[str, Any]:
        """What GET /status shows of the engine (models, queues, memory, the engine itself)."""

    @abstractmethod
    def paused_for_capacity(self) -> frozenset[str]:
        """Request ids of sample requests waiting for KV-cache memory."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the engine (in-flight work is dropped)."""

    def call(self, request: m.Request, timeout: float) -> m.Done:
        """Submit work nobody polls for and wait for its answer (for quick checks in a route)."""
        request_id = f"call-{uuid.uuid4().hex}"
        event, slot = threading.Event(), list[m.Done]()
        with self._lock:
            self._waiters[request_id] = (event, slot)
        self.submit(m.Work(request_id, request))
        if not event.wait(timeout):
            with self._lock:
                self._waiters.pop(request_id, None)
            return m.Done(request_id, error="the engine did not answer in time", category="server")
        return slot[0]

    def _deliver(self, done: m.Done) -> None:
        """Route one result: to a waiting `call`, else to the on_done handler."""
        with self._lock:
            waiter = self._waiters.pop(done.request_id, None)
        if waiter is not None:
            waiter[1].append(done)
            waiter[0].set()
        else:
            self._on_done(done)
