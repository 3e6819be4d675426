"""The engine in a process of its own, behind two ZeroMQ sockets (what `lathe serve` runs).

This side binds the sockets (in a private folder, so only this user can reach them) and starts
`python -m lathe.engine.process`; a restarted engine connects to the same sockets. Nothing of
torch is imported here.

If the engine process dies, the API stays up: every request it held fails with a retryable
error (retrieve_future answers 410, on which the SDK re-sends samples itself), a new engine is
started, and GET /status says so. Samplers made from saved weights or a base model are made
again in the new engine; training models and unnamed sampler snapshots live only in engine
memory, so the new engine refuses their requests with a message that says how to go on.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from typing import Any

import zmq

from lathe.client.base import EngineClient, OnDone
from lathe.protocol import codec
from lathe.protocol import messages as m

log = logging.getLogger(__name__)

LOST_WORK = (
    "the engine process stopped before this request finished (it has been restarted); "
    "retry the request"
)
READY_TIMEOUT_S = 600.0  # loading big base models takes a while
MAX_BACKOFF_S = 30.0  # between restarts of an engine that keeps dying


class EngineStartError(RuntimeError):
    """The engine process exited before it was ready (its own log says why)."""


class OwnProcessEngine(EngineClient):
    def __init__(self, spec: m.EngineSpec) -> None:
        super().__init__()
        self.spec = spec
        self._dir = tempfile.mkdtemp(prefix="lathe-engine-")  # mode 0700
        self._ctx = zmq.Context()
        self._work = self._ctx.socket(zmq.PUSH)
        self._work.setsockopt(zmq.LINGER, 0)
        self._work.bind(f"ipc://{self._dir}/work")
        self._results = self._ctx.socket(zmq.PULL)
        self._results.setsockopt(zmq.LINGER, 0)
        self._results.bind(f"ipc://{self._dir}/results")
        self._outgoing: queue.Queue[bytes | None] = queue.Queue()
        self._in_flight: dict[str, m.Work] = {}  # submitted, not answered
        self._models: set[str] = set()  # training models the engine holds
        self._lost: set[str] = set()  # models that died with an earlier engine
        self._samplers: dict[str, m.CreateSamplerRequest] = {}  # made again after a restart
        self._snapshots: set[str] = set()  # samplers only in engine memory: lost with it
        self._lost_samplers: set[str] = set()
        self._status: dict[str, Any] = {}
        self._paused: frozenset[str] = frozenset()
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready = threading.Event()
        self._stopping = False
        self.restarts = 0
        self.last_exit: str | None = None
        self._threads: list[threading.Thread] = []

    # --- life cycle ---------------------------------------------------------------------

    def start(self, on_done: OnDone) -> None:
        self._on_done = on_done
        self._threads = [
            threading.Thread(target=self._send_loop, name="lathe-engine-send", daemon=True),
            threading.Thread(target=self._receive_loop, name="lathe-engine-recv", daemon=True),
        ]
        for t in self._threads:
            t.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._ready.wait(0.1):
            proc = self._proc
            if proc is not None and proc.poll() is not None:
                self.stop()
                raise EngineStartError(
                    f"the engine process exited with code {proc.returncode} while starting; "
                    "its log above says why"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise EngineStartError(f"the engine was not ready after {READY_TIMEOUT_S:.0f} s")

    def _spawn(self) -> None:
        spec = replace(
            self.spec,
            lost_model_ids=sorted(self._lost),
            lost_sampler_ids=sorted(self._lost_samplers),
        )
        self._ready.clear()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "lathe.engine.process", *self._addresses()],
            stdin=subprocess.PIPE,  # the spec; its log goes where ours does
        )
        assert self._proc.stdin is not None
        self._proc.stdin.write(codec.encode_spec(spec))
        self._proc.stdin.close()
        for req in self._samplers.values():  # queued for the new engine, answered to nobody
            self._outgoing.put(codec.encode_work(m.Work("", req)))
        log.info("engine process %d started", self._proc.pid)

    def _addresses(self) -> list[str]:
        return [f"ipc://{self._dir}/work", f"ipc://{self._dir}/results", str(os.getpid())]

    def stop(self) -> None:
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                self._work.send(codec.encode_stop(), zmq.NOBLOCK)
                proc.wait(timeout=10)
            except (zmq.ZMQError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        self._outgoing.put(None)
        for t in self._threads:
            t.join(timeout=5)
        self._ctx.destroy(linger=0)
        shutil.rmtree(self._dir, ignore_errors=True)

    # --- work out, results in -----------------------------------------------------------

    def submit(self, work: m.Work) -> None:
        frame = codec.encode_work(work)  # a message the schema does not know fails here
        with self._lock:
            if work.request_id:
                self._in_flight[work.request_id] = work
            self._track(work.request)
        self._outgoing.put(frame)

    def _track(self, req: m.Request) -> None:
        """What a restarted engine must be told (lost models) or given again (samplers)."""
        match req:
            case m.CreateModelRequest():
                self._models.add(req.model_id)
            case m.LoadRequest(create=True):
                self._models.add(req.model_id)
            case m.CreateSamplerRequest():
                self._samplers[req.sampler_id] = req
            case m.SnapshotRequest():
                self._snapshots.add(req.sampler_id)
            case m.UnloadRequest():
                self._models.difference_update(req.model_ids)
                for sampler_id in req.sampler_ids:
                    self._samplers.pop(sampler_id, None)
                    self._snapshots.discard(sampler_id)

    def _send_loop(self) -> None:
        """The only user of the work socket; a send waits while no engine is connected."""
        while (frame := self._outgoing.get()) is not None:
            try:
                self._work.send(frame)
            except zmq.ZMQError:
                if self._stopping:
                    return
                log.exception("sending work to the engine failed")

    def _receive_loop(self) -> None:
        """The only user of the results socket; also starts and watches the engine process
        (from this one long-lived thread: the engine is set to die with the thread that
        started it, so a killed API never leaves an engine behind)."""
        self._spawn()
        while not self._stopping:
            try:
                if self._results.poll(200):
                    self._handle(self._results.recv())
                    continue
            except zmq.ZMQError:
                if self._stopping:
                    return
                raise
            proc = self._proc
            if proc is not None and proc.poll() is not None and not self._stopping:
                while self._results.poll(0):  # what it sent before it died still counts
                    self._handle(self._results.recv())
                self._restart(proc.returncode)

    def _handle(self, frame: bytes) -> None:
        try:
            kind, message = codec.decode(frame)
        except Exception:
            log.exception("dropped a malformed frame from the engine")
            return
        if kind == "status":
            self._status, self._paused = message
            self._ready.set()
        elif kind == "done":
            if not message.is_progress:
                with self._lock:
                    self._in_flight.pop(message.request_id, None)
            try:
                self._deliver(message)
            except Exception:  # one bad result must not stop the others
                log.exception("finishing %s failed", message.request_id)

    def _restart(self, returncode: int) -> None:
        self.restarts += 1
        self.last_exit = f"exit code {returncode} at {time.strftime('%Y-%m-%d %H:%M:%S')}"
        with self._lock:
            lost_work = list(self._in_flight)
            self._in_flight.clear()
            self._lost |= self._models
            self._models.clear()
            self._lost_samplers |= self._snapshots
            self._snapshots.clear()
        log.error(
            "the engine process died (%s); failing %d in-flight request(s), %d training "
            "model(s) lost; restarting it",
            self.last_exit,
            len(lost_work),
            len(self._lost),
        )
        self._status, self._paused = {}, frozenset()
        self._ready.clear()  # "starting" until the new engine reports its first status
        for request_id in lost_work:
            self._deliver(m.Done(request_id, error=LOST_WORK, category="retry"))
        time.sleep(min(MAX_BACKOFF_S, 0.5 * 2 ** min(self.restarts - 1, 6)))
        if not self._stopping:
            self._spawn()

    # --- what the API reads -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        proc = self._proc
        engine = {
            "mode": "own_process",
            "pid": proc.pid if proc is not None else None,
            "state": "running" if self._ready.is_set() else "starting",
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "lost_training_models": len(self._lost),
            "lost_samplers": len(self._lost_samplers),
        }
        return {**self._status, "engine": engine}

    def paused_for_capacity(self) -> frozenset[str]:
        return self._paused
