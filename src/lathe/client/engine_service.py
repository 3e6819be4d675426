"""One engine shared by several API replicas: what `lathe engine --listen tcp://HOST:PORT` runs.

The service runs the engine exactly as `lathe serve` does (client/own_process.py: its own
process, restarted if it dies, `--ranks N` for a torch.distributed group; under torchrun,
rank 0's engine itself, client/group_engine.py) and serves it on a
ZeroMQ ROUTER socket (client/engine_link.py: CURVE keys from the data dir's secret). Each
replica (`lathe serve --engine tcp://HOST:PORT`) connects with a DEALER socket; its work goes
to the engine, and each result goes back to the replica that submitted it, which turns it
into its future's payload. Every replica gets the engine's status twice a second.

The service writes checkpoints into the data dir the replicas name in their requests, so
every replica and the service must see the same data dir (one machine, or a shared
filesystem). Nothing a replica sends can stop the engine: only the service's own signal does.
"""

from __future__ import annotations

import logging
import threading
import time

import zmq
import zmq.auth.thread

from lathe.client.base import EngineClient
from lathe.client.engine_link import SILENT_S, STATUS_EVERY_S, Mailbox, link_keys
from lathe.protocol import codec
from lathe.protocol import messages as m

log = logging.getLogger(__name__)


class ReplicaKey:
    """ZAP policy: only the replicas' key (derived from the shared secret) may connect."""

    def __init__(self, client_public: bytes) -> None:
        self.client_public = client_public

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.client_public


class EngineService:
    def __init__(self, engine: EngineClient, listen: str, secret: bytes) -> None:
        self.listen = listen
        self.engine = engine
        self._secret = secret
        self._owners: dict[str, bytes] = {}  # request id -> the replica that submitted it
        self._replicas: dict[bytes, float] = {}  # replica identity -> when last heard
        self._outbox: Mailbox[tuple[bytes, bytes]] = Mailbox()  # (replica, frame) to send
        self._lock = threading.Lock()

    def run(self, stop: threading.Event) -> None:
        """Start the engine, then serve replicas until `stop` is set."""
        self.engine.start(self._route)  # returns once the engine is ready
        keys = link_keys(self._secret)
        ctx = zmq.Context()
        auth = zmq.auth.thread.ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve_callback("*", credentials_provider=ReplicaKey(keys.client_public))
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.curve_server = True
        sock.curve_secretkey = keys.server_secret
        sock.bind(self.listen)
        log.info("engine service listening on %s", self.listen)
        try:
            self._serve(sock, stop)
        finally:
            auth.stop()
            ctx.destroy(linger=0)
            self.engine.stop()
            self._outbox.close()

    def _serve(self, sock: zmq.Socket, stop: threading.Event) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._outbox.fd, zmq.POLLIN)
        last_status = 0.0
        while not stop.is_set():
            ready = dict(poller.poll(100))
            if sock in ready:
                while sock.poll(0):
                    self._receive(*sock.recv_multipart())
            for replica, frame in self._outbox.take_all():
                self._send(sock, replica, frame)
            now = time.monotonic()
            if now - last_status >= STATUS_EVERY_S:
                last_status = now
                status = codec.encode_status(self._status(), self.engine.paused_for_capacity())
                for replica, heard in list(self._replicas.items()):
                    if now - heard > SILENT_S:
                        del self._replicas[replica]  # gone (or restarted under a new identity)
                    else:
                        self._send(sock, replica, status)

    def _receive(self, replica: bytes, frame: bytes) -> None:
        self._replicas[replica] = time.monotonic()
        try:
            kind, work = codec.decode(frame)
        except Exception:
            log.exception("dropped a malformed frame from replica %r", replica)
            return
        if kind == "work":
            if work.request_id:
                with self._lock:
                    self._owners[work.request_id] = replica
            self.engine.submit(work)
        elif kind == "stop":
            log.warning("replica %r asked the shared engine to stop: ignored", replica)

    def _send(self, sock: zmq.Socket, replica: bytes, frame: bytes) -> None:
        try:
            sock.send_multipart([replica, frame], zmq.NOBLOCK)
        except zmq.Again:  # the replica stopped reading; its futures fail on its side
            log.warning("replica %r is not reading; a frame to it was dropped", replica)

    def _route(self, done: m.Done) -> None:
        """A result, on the engine client's thread: back to the replica that asked."""
        with self._lock:
            owners = self._owners
            replica = (
                owners.get(done.request_id)
                if done.is_progress
                else owners.pop(done.request_id, None)
            )
        if replica is None:
            log.warning("result for %s has no replica to go to; dropped", done.request_id)
            return
        self._outbox.put((replica, codec.encode_done(done)))

    def _status(self) -> dict:
        status = self.engine.status()
        status["engine"]["service"] = {"address": self.listen, "replicas": len(self._replicas)}
        return status
