"""The engine as a process of its own: `python -m lathe.engine.process WORK RESULTS PID`.

Started by client/own_process.py, which binds two ZeroMQ sockets and passes their addresses
and its own PID; the engine's `EngineSpec` arrives on standard input. Frames are
protocol/codec.py's: work (and "stop") come in on WORK; results and status go out on RESULTS.
The process ends on "stop", when its parent dies, or when it is killed: the API then restarts
it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import sys
import threading
import time

import zmq

from lathe.engine.build import build_engine
from lathe.engine.group import Group, free_port, start_ranks, watch_ranks
from lathe.engine.loop import Engine
from lathe.protocol import codec

log = logging.getLogger("lathe.engine")

STATUS_EVERY_S = 0.25  # how often status and the paused set are sent when they changed


def send_results(engine: Engine, sock: zmq.Socket, running: threading.Event) -> None:
    """Results as they come, and the engine's status when it changed (one thread owns sock)."""
    sent_status: object = None
    sent_paused: frozenset[str] | None = None
    last = 0.0
    while running.is_set():
        try:
            done = engine.outbox.get(timeout=0.05)
            sock.send(codec.encode_done(done))
        except queue.Empty:
            pass
        now = time.monotonic()
        changed = engine.status is not sent_status or engine.paused_for_capacity != sent_paused
        if changed and now - last >= STATUS_EVERY_S:
            sent_status, sent_paused, last = engine.status, engine.paused_for_capacity, now
            sock.send(codec.encode_status(engine.status, engine.paused_for_capacity))


def die_with_parent() -> None:
    """Linux: be killed when the API process dies, even by SIGKILL (elsewhere: polled below)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    work_address, results_address, parent_pid = argv
    parent = int(parent_pid)
    die_with_parent()
    if os.getppid() != parent:  # it died before the line above
        return 1
    logging.basicConfig(
        level=os.environ.get("LATHE_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s engine[%(process)d] %(name)s: %(message)s",
    )
    spec = codec.decode_spec(sys.stdin.buffer.read())
    group, ranks, serving = None, [], threading.Event()
    serving.set()
    if spec.ranks > 1:  # this process is rank 0 of an engine group (engine/group.py)
        port = free_port()
        ranks = start_ranks(spec, port)
        watch_ranks(ranks, serving)
        group = Group(0, spec.ranks, spec.device, f"tcp://127.0.0.1:{port}")
    engine = build_engine(spec, group)
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(work_address)
    outbox = ctx.socket(zmq.PUSH)
    outbox.setsockopt(zmq.LINGER, 2000)  # let the last results out when stopping
    outbox.connect(results_address)
    engine.start()
    engine.publish()
    running = threading.Event()
    running.set()
    sender = threading.Thread(target=send_results, args=(engine, outbox, running), daemon=True)
    sender.start()
    log.info("engine ready: %s on %s", ", ".join(spec.models), spec.device)
    while True:
        if not inbox.poll(500):
            if os.getppid() != parent:  # the API process is gone: nobody is waiting
                log.warning("the API process went away; stopping")
                break
            continue
        try:
            kind, work = codec.decode(inbox.recv())
        except Exception:  # a frame the schema refuses: drop it, keep serving the rest
            log.exception("dropped a malformed frame from the API")
            continue
        if kind == "stop":
            break
        if kind == "work":
            engine.submit(work)
    serving.clear()  # the other ranks exit after the stop: that is no failure
    engine.stop()
    running.clear()
    sender.join(timeout=5)
    ctx.destroy(linger=2000)
    if group is not None:
        group.close()
        for rank in ranks:
            rank.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
