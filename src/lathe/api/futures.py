"""Futures: every engine request answers its POST with a request id, polled for the result.

The registry maps request ids to their state. The engine client's thread completes them
(`complete`);
`retrieve_future` handlers wait on them without blocking the event loop (`wait`). Every
future is also written to the database, so a result survives a restart of the server.
Retried POSTs carry the same natural key ((model, seq), (sampler, seq), ...) and get the
same future back, so nothing runs twice.

Several API replicas may share the database (and one engine service). Each future row names
the replica that submitted its work: only that replica receives the result and writes it.
Another replica asked for the future while it is pending watches the row until the owner
writes it, as long as the owner keeps beating (`beat`, every REPLICA_BEAT_S); a pending row
whose owner stopped is reported lost, and the client retries.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import IntegrityError

from lathe.api.step_metrics import Step
from lathe.api.usage_accounting import Usage
from lathe.protocol import messages as m
from lathe.store.db import FutureRow, StepMetricsRow, Store, UsageRow

log = logging.getLogger(__name__)

# Turns an engine result into the wire payload: (media type, body bytes). Each takes the
# result type of its own request (m.Result narrowed), hence Any.
Finisher = Callable[[Any], tuple[str, bytes]]

KEEP_DONE_IN_MEMORY_S = 600.0  # completed futures are then served from the database
REPLICA_BEAT_S = 5.0  # how often a replica records that it is alive
REPLICA_SILENT = dt.timedelta(seconds=30)  # a replica silent this long has stopped
WATCH_ROW_S = 0.2  # how often a future another replica holds is read again
LOST_WITH_REPLICA = "the server restarted before this request finished; please retry"


@dataclass
class FutureState:
    request_id: str
    kind: str  # request type, e.g. "forward_backward"
    owner_id: int  # the user whose request it is
    finisher: Finisher | None
    status: str = "pending"  # pending | done | failed
    media_type: str | None = None
    payload: bytes | None = None
    error: str | None = None
    category: str | None = None
    completed_at: float | None = None
    event: asyncio.Event = field(default_factory=asyncio.Event)
    usage: Usage | None = None  # counted when it succeeds (GET /billing/usage/events)
    step: Step | None = None  # the training step whose metrics it reports (run curves)
    held_elsewhere: bool = False  # pending in another live replica, which will write it
    # a streamed sample's progress reports (m.SampleProgress), taken by its one reader
    progress: list[Any] = field(default_factory=list)
    progressed: asyncio.Event = field(default_factory=asyncio.Event)


class ReusedKey(Exception):
    """A request reused the natural key of an earlier, different request."""


class FutureRegistry:
    def __init__(self, store: Store, replica_id: str | None = None) -> None:
        self.store = store
        self.replica_id = replica_id or uuid.uuid4().hex  # this API process, in future rows
        self._futures: dict[str, FutureState] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[str, int] = {}  # kind -> unfinished futures
        self._sample_finished = asyncio.Event()  # set (and replaced) when a sample finishes
        self._pending_by_owner: dict[int, int] = {}  # user id -> unfinished futures

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop whose waiters `complete` wakes (the server's)."""
        self._loop = loop

    def create(
        self,
        kind: str,
        natural_key: str | None,
        finisher: Finisher | None,
        owner_id: int,
        fingerprint: str = "",
        usage: Usage | None = None,
        step: Step | None = None,
    ) -> tuple[str, bool]:
        """A new pending future, or the existing one for this natural key.

        `fingerprint` identifies the request's content: a retried POST carries the same one; a
        different request under the same key raises ReusedKey. Returns (request_id, created).
        """
        if natural_key is not None:
            existing = self.store.future_by_key(natural_key)
            if existing is not None:
                return self._same_request(existing, kind, fingerprint), False
        request_id = f"req-{uuid.uuid4().hex}"
        row = FutureRow(
            request_id=request_id,
            kind=kind,
            natural_key=natural_key,
            fingerprint=fingerprint,
            owner_id=owner_id,
            replica_id=self.replica_id,
        )
        try:
            self.store.add(row)
        except IntegrityError:  # a concurrent duplicate won the race
            existing = self.store.future_by_key(natural_key or "")
            if existing is None:
                raise
            return self._same_request(existing, kind, fingerprint), False
        with self._lock:
            self._evict_old()
            self._futures[request_id] = FutureState(
                request_id, kind, owner_id, finisher, usage=usage, step=step
            )
            self._pending[kind] = self._pending.get(kind, 0) + 1
            self._pending_by_owner[owner_id] = self._pending_by_owner.get(owner_id, 0) + 1
        return request_id, True

    def pending(self, kind: str) -> int:
        """Futures of this kind not finished yet (for backpressure)."""
        return self._pending.get(kind, 0)

    def pending_for(self, owner_id: int) -> int:
        """A user's unfinished futures (for the queued-requests limit)."""
        return self._pending_by_owner.get(owner_id, 0)

    @staticmethod
    def _same_request(existing: FutureRow, kind: str, fingerprint: str) -> str:
        if existing.kind != kind or existing.fingerprint != fingerprint:
            raise ReusedKey(existing.kind)
        return existing.request_id

    def complete_now(self, request_id: str, media_type: str, content: dict) -> None:
        """Finish a future whose result needs no engine work."""
        with self._lock:
            state = self._futures[request_id]
        state.finisher = lambda _: (media_type, json.dumps(content).encode())
        self.complete(m.Done(request_id, result=m.Empty()))

    def fail_now(self, request_id: str, error: str, category: m.Category = "user") -> None:
        self.complete(m.Done(request_id, error=error, category=category))

    def complete(self, done: m.Done) -> None:
        """Record a result; called from the engine client's thread, never the engine's."""
        if not done.request_id:  # internal work nobody waits for (e.g. unloading a session)
            return
        with self._lock:
            state = self._futures.get(done.request_id)
        if state is None:
            log.warning("result for unknown future %s dropped", done.request_id)
            return
        if state.status != "pending":  # e.g. a refused request whose seq id was then skipped
            return
        if done.is_progress:  # the request goes on; its reader (next_progress) takes this
            with self._lock:
                state.progress.append(done.result)
            if self._loop is not None:
                self._loop.call_soon_threadsafe(state.progressed.set)
            return
        if done.error is None and done.result is not None and state.finisher is not None:
            try:
                state.media_type, state.payload = state.finisher(done.result)
                state.status = "done"
            except Exception as e:
                log.error("finishing %s failed:\n%s", done.request_id, traceback.format_exc())
                state.status, state.error, state.category = (
                    "failed",
                    f"internal error: {e}",
                    "server",
                )
        else:
            state.status, state.error, state.category = "failed", done.error, done.category
        state.completed_at = time.monotonic()
        with self._lock:
            self._pending[state.kind] -= 1
            self._pending_by_owner[state.owner_id] -= 1
        records: list[UsageRow | StepMetricsRow] = []
        if state.status == "done" and state.step is not None:
            if (reported := state.step.record(done.result)) is not None:
                records.append(reported)
        if state.status == "done" and state.usage is not None:
            records += [
                UsageRow(
                    owner_id=state.owner_id,
                    session_id=state.usage.session_id,
                    base_model=state.usage.base_model,
                    event=event,
                    cached=cached,
                    count=count,
                )
                for event, cached, count in state.usage.rows(done.result)
            ]
        self.store.finish_future(
            state.request_id,
            state.status,
            state.media_type,
            state.payload,
            state.error,
            state.category,
            records,
        )
        if self._loop is not None:
            self._loop.call_soon_threadsafe(state.event.set)
            if state.kind == "sample":
                self._loop.call_soon_threadsafe(self._pulse_samples)

    def _pulse_samples(self) -> None:
        event, self._sample_finished = self._sample_finished, asyncio.Event()
        event.set()

    async def sample_finished(self, timeout: float) -> None:
        """Return when a sample finishes on this replica, or after `timeout` seconds (another
        replica's completions show up in the database only)."""
        try:
            await asyncio.wait_for(self._sample_finished.wait(), timeout)
        except TimeoutError:
            pass

    async def next_progress(self, request_id: str, timeout: float) -> tuple[list[Any], bool]:
        """(progress reports since the last call, finished?) of a streamed request this
        replica submitted; waits up to `timeout` seconds for either."""
        with self._lock:
            state = self._futures[request_id]
        if not state.progress and state.status == "pending":
            state.progressed.clear()
            waiter = asyncio.ensure_future(state.progressed.wait())
            finished = asyncio.ensure_future(state.event.wait())
            await asyncio.wait({waiter, finished}, timeout=timeout, return_when="FIRST_COMPLETED")
            waiter.cancel()
            finished.cancel()
        with self._lock:
            reports, state.progress = state.progress, []
        return reports, state.status != "pending"

    async def wait(self, request_id: str, timeout: float, owner_id: int) -> FutureState | None:
        """The future's state once finished, or still pending after `timeout` seconds.

        None if the id is unknown or belongs to another user.
        """
        with self._lock:
            state = self._futures.get(request_id)
        if state is None:
            state = self._from_db(request_id)
        if state is None or state.owner_id != owner_id:
            return None
        if state.held_elsewhere:
            return await self._watch_row(state, timeout)
        if state.status == "pending":
            try:
                await asyncio.wait_for(state.event.wait(), timeout)
            except TimeoutError:
                pass
        return state

    async def _watch_row(self, state: FutureState, timeout: float) -> FutureState:
        """Wait for the replica that holds this future to write its result."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(WATCH_ROW_S)
            now = await asyncio.to_thread(self._from_db, state.request_id)
            if now is not None and not now.held_elsewhere:
                return now
        return state

    def beat(self) -> None:
        """Record that this replica is alive and holds its pending futures."""
        self.store.beat(self.replica_id)

    def _from_db(self, request_id: str) -> FutureState | None:
        row = self.store.get(FutureRow, request_id)
        if row is None:
            return None
        state = FutureState(
            row.request_id,
            row.kind,
            row.owner_id,
            None,
            row.status,
            row.media_type,
            row.payload,
            row.error,
            row.category,
        )
        if row.status == "pending":
            holder = row.replica_id
            if (
                holder
                and holder != self.replica_id
                and self.store.replica_alive(holder, REPLICA_SILENT)
            ):
                state.held_elsewhere = True
            else:  # its work was lost with a stopped replica or a previous server process
                state.status, state.category, state.error = "failed", "server", LOST_WITH_REPLICA
        return state

    def _evict_old(self) -> None:
        now = time.monotonic()
        stale = [
            rid
            for rid, s in self._futures.items()
            if s.completed_at is not None and now - s.completed_at > KEEP_DONE_IN_MEMORY_S
        ]
        for rid in stale:
            del self._futures[rid]
