"""Client sessions: created once per ServiceClient, kept alive by heartbeats."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Query

from lathe.api import schemas as s
from lathe.api.deps import CallerDep
from lathe.store.db import SessionRow, utcnow

router = APIRouter(tags=["sessions"])


@router.post("/create_session")
def create_session(body: s.CreateSession, caller: CallerDep) -> dict:
    session_id = f"sess-{uuid.uuid4().hex[:16]}"
    caller.state.store.add(
        SessionRow(
            session_id=session_id,
            owner_id=caller.user_id,
            sdk_version=body.sdk_version,
            tags=body.tags,
            user_metadata=body.user_metadata or {},
            project_id=body.project_id,
            display_name=body.display_name,
        )
    )
    return {"session_id": session_id, "type": "create_session"}


@router.post("/session_heartbeat")
def session_heartbeat(body: s.SessionHeartbeat, caller: CallerDep) -> dict:
    caller.session(body.session_id)
    caller.state.store.touch_session(body.session_id)
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
def finish_session(session_id: str, body: s.FinishSession, caller: CallerDep) -> dict:
    caller.session(session_id)
    with caller.state.store.session() as db, db.begin():
        row = db.get(SessionRow, session_id)
        if row is not None and row.finished_at is None:  # first finish wins
            row.finished_at = utcnow()
    return {}


@router.get("/sessions")
def list_sessions(
    caller: CallerDep, limit: int = Query(20, ge=1, le=1000), offset: int = Query(0, ge=0)
) -> dict:
    rows = caller.state.store.sessions_of(caller.user_id, limit, offset)
    return {"sessions": [r.session_id for r in rows]}


@router.get("/sessions/{session_id}")
def get_session(session_id: str, caller: CallerDep) -> dict:
    row = caller.session(session_id)
    runs, samplers = caller.state.store.rows_of_session(session_id)
    return {
        "training_run_ids": runs,
        "sampler_ids": samplers,
        "user_metadata": {k: str(v) for k, v in (row.user_metadata or {}).items()},
        "display_name": row.display_name,
    }


@router.put("/sessions/{session_id}/project")
def set_project(session_id: str, body: s.SessionProject, caller: CallerDep) -> dict:
    caller.session(session_id)
    with caller.state.store.session() as db, db.begin():
        db.get(SessionRow, session_id).project_id = body.project_id
    return {}
