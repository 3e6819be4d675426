"""Client sessions: created once per ServiceClient, kept alive by heartbeats."""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, HTTPException, Query, Request

from lathe.api import responses as r
from lathe.api import schemas as s
from lathe.api import session_search, session_work
from lathe.api.deps import CallerDep
from lathe.api.session_work import end_session
from lathe.api.signed_files import DOWNLOAD_SECONDS, sign_trace
from lathe.store import tinker_paths
from lathe.store.db import SessionRow, utcnow

router = APIRouter(tags=["sessions"])


@router.post("/create_session")
def create_session(body: s.CreateSession, caller: CallerDep) -> r.SessionCreated:
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
    return r.SessionCreated(session_id=session_id)


@router.post("/session_heartbeat")
def session_heartbeat(body: s.SessionHeartbeat, caller: CallerDep) -> r.HeartbeatAck:
    row = caller.session(body.session_id)
    if row.finished_at is not None:  # 410 makes the SDK stop heart-beating
        raise HTTPException(410, f"session {body.session_id!r} has ended")
    caller.state.store.touch_session(body.session_id)
    return r.HeartbeatAck()


@router.post("/sessions/{session_id}/finish")
def finish_session(session_id: str, body: s.FinishSession, caller: CallerDep) -> r.Empty:
    caller.session(session_id)
    kind = (body.reason or {}).get("type")
    reason = kind if kind in ("success", "errored", "interrupted") else "success"
    end_session(caller.state, session_id, reason, body.detail)  # the first finish wins
    return r.Empty()


@router.get("/sessions")
def list_sessions(
    caller: CallerDep, limit: int = Query(20, ge=1, le=1000), offset: int = Query(0, ge=0)
) -> r.SessionList:
    rows = caller.state.store.sessions_of(caller.user_id, limit, offset)
    return r.SessionList(sessions=[row.session_id for row in rows])


@router.post("/sessions/search")
def search_sessions(body: s.SessionSearch, caller: CallerDep) -> r.SessionSearchPage:
    return session_search.search(caller, body)


@router.get("/sessions/{session_id}/trace_export")
def trace_export(session_id: str, caller: CallerDep, request: Request) -> r.TraceExport:
    """A signed URL of the session's timeline (api/session_trace.py), ready at once."""
    caller.session(session_id)
    expires = utcnow() + dt.timedelta(seconds=DOWNLOAD_SECONDS)
    path = sign_trace(caller.state.keys.secret, session_id, expires)
    return r.TraceExport(status="ready", url=str(request.base_url).rstrip("/") + path)


@router.get("/sessions/{session_id}")
def get_session(session_id: str, caller: CallerDep) -> r.SessionInfo:
    row = caller.session(session_id)
    runs, samplers = caller.state.store.rows_of_session(session_id)
    return r.SessionInfo(
        training_run_ids=runs,
        sampler_ids=samplers,
        user_metadata=r.str_metadata(row.user_metadata),
        display_name=row.display_name,
    )


@router.put("/sessions/{session_id}/project")
def set_project(session_id: str, body: s.SessionProject, caller: CallerDep) -> r.Empty:
    caller.session(session_id)
    session_work.set_project(caller.state, session_id, body.project_id)
    return r.Empty()
