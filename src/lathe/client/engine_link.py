"""What both ends of a shared engine's TCP link use: its keys, and a mailbox for its socket.

The engine service (`lathe engine --listen tcp://HOST:PORT`, client/engine_service.py) and
the API replicas that use it (`lathe serve --engine tcp://HOST:PORT`, client/remote.py) talk
over one ZeroMQ ROUTER/DEALER pair, encrypted and authenticated with CURVE. Both sides derive
the keys from the data dir's `secret.key`, which the replicas share anyway (it hashes their
API keys): only a process that can read it can send work to the engine or read its results.

Frames are protocol/codec.py's, plus ["hello"], which a replica sends when it connects and
then every HELLO_EVERY_S so the service keeps sending it status.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import queue
from dataclasses import dataclass
from typing import Generic, TypeVar

import zmq
from zmq.utils import z85

HELLO_EVERY_S = 2.0  # a replica's hello: "I am here, send me status"
STATUS_EVERY_S = 0.5  # the service's status to each replica; also its sign of life
SILENT_S = 10.0  # a peer not heard from this long is gone

T = TypeVar("T")


@dataclass(frozen=True)
class LinkKeys:
    """CURVE key pairs (Z85 text) of the service and of its replicas."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes


def link_keys(secret: bytes) -> LinkKeys:
    """The link's keys, derived from the data dir's secret (the same on every side)."""

    def pair(role: bytes) -> tuple[bytes, bytes]:
        private = z85.encode(hmac.new(secret, role, hashlib.sha256).digest())
        return zmq.curve_public(private), private

    server_public, server_secret = pair(b"lathe engine service")
    client_public, client_secret = pair(b"lathe api replica")
    return LinkKeys(server_public, server_secret, client_public, client_secret)


class Mailbox(Generic[T]):
    """Items other threads hand to the one thread that owns a ZeroMQ socket (sockets are not
    thread-safe); a byte on a pipe wakes that thread's poller, so nothing waits for a timeout."""

    def __init__(self) -> None:
        self._items: queue.SimpleQueue[T] = queue.SimpleQueue()
        self.fd, self._wake = os.pipe()  # poll `fd` beside the socket
        os.set_blocking(self.fd, False)
        os.set_blocking(self._wake, False)

    def put(self, item: T) -> None:
        self._items.put(item)
        try:
            os.write(self._wake, b"\0")
        except BlockingIOError:  # the pipe is full of wake-ups already: the reader will come
            pass
        except OSError:  # closed: the socket's thread has stopped, nobody will send it
            pass

    def take_all(self) -> list[T]:
        """Everything put so far (call when `fd` is readable, or any time)."""
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass
        items = []
        while True:
            try:
                items.append(self._items.get_nowait())
            except queue.Empty:
                return items

    def close(self) -> None:
        os.close(self.fd)
        os.close(self._wake)
