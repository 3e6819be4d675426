"""Client sessions: created once per ServiceClient, kept alive by heartbeats."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, HTTPException

from lathe.api import schemas as s
from lathe.api.deps import State, session_or_404
from lathe.store.db import SessionRow, utcnow

router = APIRouter(tags=["sessions"])


@router.post("/create_session")
def create_session(body: s.CreateSession, state: State) -> dict:
    session_id = f"sess-{uuid.uuid4().hex[:16]}"
    state.store.add(
        SessionRow(
            session_id=session_id,
            sdk_version=body.sdk_version,
            tags=body.tags,
            user_metadata=body.user_metadata or {},
        )
    )
    return {"session_id": session_id, "type": "create_session"}


@router.post("/session_heartbeat")
def session_heartbeat(body: s.SessionHeartbeat, state: State) -> dict:
    if not state.store.touch_session(body.session_id):
        raise HTTPException(404, f"session {body.session_id!r} not found")
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
def finish_session(session_id: str, body: s.FinishSession, state: State) -> dict:
    session_or_404(state, session_id)
    with state.store.session() as db, db.begin():
        row = db.get(SessionRow, session_id)
        if row is not None and row.finished_at is None:  # first finish wins
            row.finished_at = utcnow()
    return {}
