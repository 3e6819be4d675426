"""An API replica's client of a shared engine (`lathe serve --engine tcp://HOST:PORT`).

The engine runs in `lathe engine --listen tcp://HOST:PORT` (client/engine_service.py), which
starts, watches and restarts it; this side only sends work and receives its results and the
engine's status over one DEALER socket (client/engine_link.py), from one thread of its own.
Nothing of torch is imported here.

If the service goes silent for SILENT_S, every request this replica has in flight fails with a
retryable error (the SDK retries) and GET /status says the engine is unreachable; ZeroMQ
reconnects by itself when the service is back.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import zmq

from lathe.client.base import EngineClient, OnDone
from lathe.client.engine_link import HELLO_EVERY_S, SILENT_S, Mailbox, link_keys
from lathe.client.own_process import READY_TIMEOUT_S, EngineStartError
from lathe.protocol import codec
from lathe.protocol import messages as m

log = logging.getLogger(__name__)

UNREACHABLE = "the engine service stopped answering before this request finished; retry the request"
QUEUE_FULL = "too much work is waiting for the engine service; retry the request"


class RemoteEngine(EngineClient):
    def __init__(self, address: str, secret: bytes, models: list[str]) -> None:
        """models: the base model names this replica serves; the engine must serve them all."""
        super().__init__()
        self.address = address
        self._models = models
        self._keys = link_keys(secret)
        self._outbox: Mailbox[bytes] = Mailbox()  # work frames for the socket's thread
        self._in_flight: set[str] = set()  # submitted, not answered
        self._status: dict[str, Any] = {}  # the service's: the engine's, its state included
        self._paused: frozenset[str] = frozenset()
        self._heard = 0.0  # when the service last spoke (monotonic)
        self._ready = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.unreachable_since: float | None = None

    def start(self, on_done: OnDone) -> None:
        self._on_done = on_done
        self._thread = threading.Thread(target=self._run, name="lathe-engine-link", daemon=True)
        self._thread.start()
        if not self._ready.wait(READY_TIMEOUT_S):
            self.stop()
            raise EngineStartError(
                f"no engine service answered at {self.address} in {READY_TIMEOUT_S:.0f} s: is "
                f"`lathe engine --listen {self.address}` running with this server's --data-dir?"
            )
        missing = sorted(set(self._models) - set(self._status.get("base_models", [])))
        if missing:
            self.stop()
            raise EngineStartError(
                f"the engine service at {self.address} does not serve {', '.join(missing)}; "
                "give `lathe serve` the same --model options as `lathe engine`"
            )

    def submit(self, work: m.Work) -> None:
        frame = codec.encode_work(work)  # a message the schema does not know fails here
        if work.request_id:
            with self._lock:
                self._in_flight.add(work.request_id)
        self._outbox.put(frame)

    def stop(self) -> None:
        self._stopping = True
        if self._thread is not None:
            self._thread.join(timeout=5)

    # --- the socket's thread --------------------------------------------------------------

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, uuid.uuid4().hex.encode())
        sock.curve_serverkey = self._keys.server_public
        sock.curve_publickey = self._keys.client_public
        sock.curve_secretkey = self._keys.client_secret
        sock.connect(self.address)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._outbox.fd, zmq.POLLIN)
        said_hello = 0.0
        try:
            while not self._stopping:
                now = time.monotonic()
                if now - said_hello >= HELLO_EVERY_S:
                    said_hello = now
                    self._send(sock, codec.encode_hello(), None)
                ready = dict(poller.poll(100))
                if sock in ready:
                    while sock.poll(0):
                        self._handle(sock.recv())
                for frame in self._outbox.take_all():
                    self._send(sock, frame, frame)
                if self._ready.is_set() and time.monotonic() - self._heard > SILENT_S:
                    self._lost_contact()
        finally:
            ctx.destroy(linger=0)
            self._outbox.close()

    def _send(self, sock: zmq.Socket, frame: bytes, work: bytes | None) -> None:
        try:
            sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:  # the service has been away long enough to fill the queue
            if work is not None:
                _, lost = codec.decode(work)
                self._fail([lost.request_id], QUEUE_FULL)

    def _handle(self, frame: bytes) -> None:
        try:
            kind, message = codec.decode(frame)
        except Exception:
            log.exception("dropped a malformed frame from the engine service")
            return
        self._heard = time.monotonic()
        if kind == "status":
            self._status, self._paused = message
            if not self._ready.is_set():
                if self.unreachable_since is not None:
                    log.warning("the engine service at %s answers again", self.address)
                self.unreachable_since = None
                self._ready.set()
        elif kind == "done":
            if not message.is_progress:
                with self._lock:
                    self._in_flight.discard(message.request_id)
            try:
                self._deliver(message)
            except Exception:  # one bad result must not stop the others
                log.exception("finishing %s failed", message.request_id)

    def _lost_contact(self) -> None:
        self._ready.clear()
        self.unreachable_since = time.time()
        with self._lock:
            lost = list(self._in_flight)
        log.error(
            "the engine service at %s is silent; failing %d in-flight request(s)",
            self.address,
            len(lost),
        )
        self._fail(lost, UNREACHABLE)

    def _fail(self, request_ids: list[str], error: str) -> None:
        with self._lock:
            self._in_flight.difference_update(request_ids)
        for request_id in request_ids:
            if request_id:
                self._deliver(m.Done(request_id, error=error, category="retry"))

    # --- what the API reads ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        engine = {**self._status.get("engine", {}), "mode": "shared", "address": self.address}
        if not self._ready.is_set():
            engine["state"] = "unreachable" if self.unreachable_since else "starting"
        return {**self._status, "engine": engine}

    def paused_for_capacity(self) -> frozenset[str]:
        return self._paused
