"""Client sessions: created once per ServiceClient, kept alive by heartbeats."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query

from lathe.api import schemas as s
from lathe.api.deps import CallerDep
from lathe.api.state import AppState
from lathe.protocol import messages as m
from lathe.store import tinker_paths
from lathe.store.db import SessionRow

router = APIRouter(tags=["sessions"])


@router.post("/create_session")
def create_session(body: s.CreateSession, caller: CallerDep) -> dict:
    session_id = tinker_paths.new_session_id()
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
    row = caller.session(body.session_id)
    if row.finished_at is not None:  # 410 makes the SDK stop heart-beating
        raise HTTPException(410, f"session {body.session_id!r} has ended")
    caller.state.store.touch_session(body.session_id)
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
def finish_session(session_id: str, body: s.FinishSession, caller: CallerDep) -> dict:
    caller.session(session_id)
    end_session(caller.state, session_id)  # the first finish wins
    return {}


def end_session(state: AppState, session_id: str) -> None:
    """Mark a session finished and free what it holds in the engine (checkpoints stay)."""
    if state.store.finish_session(session_id):
        runs, samplers = state.store.rows_of_session(session_id)
        state.engine.submit(m.Work("", m.UnloadRequest(runs, samplers)))


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
