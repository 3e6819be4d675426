"""The engine on a thread of this process: for tests and tools that look inside it."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from lathe.client.base import EngineClient, OnDone
from lathe.engine.build import build_engine
from lathe.engine.group import Group
from lathe.engine.loop import Engine
from lathe.protocol import messages as m

log = logging.getLogger(__name__)


class InProcessEngine(EngineClient):
    def __init__(self, spec: m.EngineSpec, group: Group | None = None) -> None:
        """group: this process is rank 0 of an engine group (client/group_engine.py)."""
        super().__init__()
        self.engine: Engine = build_engine(spec, group)  # public: tests read adapters through it
        self._pump: threading.Thread | None = None
        self._running = False

    def start(self, on_done: OnDone) -> None:
        self._on_done = on_done
        self._running = True
        self.engine.start()
        self._pump = threading.Thread(target=self._drain, name="lathe-results", daemon=True)
        self._pump.start()

    def _drain(self) -> None:
        """Results are finished here (protobuf, DB writes), off the engine's thread."""
        while self._running:
            try:
                done = self.engine.outbox.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._deliver(done)
            except Exception:  # one bad result must not stop the others
                log.exception("finishing %s failed", done.request_id)

    def submit(self, work: m.Work) -> None:
        self.engine.submit(work)

    def status(self) -> dict[str, Any]:
        return {**self.engine.status, "engine": {"mode": "in_process", "state": "running"}}

    def paused_for_capacity(self) -> frozenset[str]:
        return self.engine.paused_for_capacity

    def stop(self) -> None:
        self.engine.stop()
        self._running = False
        if self._pump is not None:
            self._pump.join(timeout=5)
