"""A session's timeline for `tinker session export-trace` (GET /sessions/{id}/trace_export).

Every request of the session's training runs and samplers that had a sequence number (so
its future is keyed to them) becomes one complete event, from its POST to its result, on a
track per training run or sampler. The file is Chrome trace-event JSON, which Perfetto
(ui.perfetto.dev) opens as it opens its own `.pftrace` files. It is built when downloaded,
so it always shows the session as it is.
"""

from __future__ import annotations

import datetime as dt
import json

from sqlalchemy import select

from lathe.store.db import FutureRow, Store, as_utc


def trace_of(store: Store, session_id: str) -> bytes:
    with store.session() as s:
        q = select(FutureRow).where(FutureRow.natural_key.like(f"%{session_id}:%"))
        rows = list(s.scalars(q.order_by(FutureRow.created_at)))
    tracks: dict[str, int] = {}
    events: list[dict] = []
    for row in rows:
        track = lane_of(row.natural_key or "")
        tid = tracks.setdefault(track, len(tracks) + 1)
        start = micros(row.created_at)
        end = micros(row.completed_at) if row.completed_at is not None else start
        events.append(
            {
                "name": row.kind,
                "cat": "sampling" if row.kind == "sample" else "training",
                "ph": "X",
                "ts": start,
                "dur": max(end - start, 1),
                "pid": 1,
                "tid": tid,
                "args": {"request_id": row.request_id, "status": row.status},
            }
        )
    names = [
        {"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": track}}
        for track, tid in tracks.items()
    ]
    process = {"name": "process_name", "ph": "M", "pid": 1, "args": {"name": session_id}}
    return json.dumps({"traceEvents": [process, *names, *events]}).encode()


def lane_of(natural_key: str) -> str:
    """The training run or sampler a keyed request belongs to."""
    kind, _, rest = natural_key.partition(":")
    if kind in ("train", "sample"):  # train:<model>:<seq>, sample:<sampler>:<seq>
        return rest.rsplit(":", 1)[0]
    return rest  # model:<model>, sampler:<sampler>


def micros(t: dt.datetime) -> int:
    return int(as_utc(t).timestamp() * 1_000_000)
