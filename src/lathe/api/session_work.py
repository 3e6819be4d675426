"""What ending or changing a client session does beyond its row: ending one frees the
engine's models and samplers of it (its checkpoints stay)."""

from __future__ import annotations

from fastapi import HTTPException

from lathe.api.state import AppState
from lathe.protocol import messages as m
from lathe.store.db import AuditEventRow, SessionRow


def end_session(
    state: AppState, session_id: str, reason: str = "success", detail: str | None = None
) -> None:
    """Mark a session finished (and why: success | errored | interrupted | expired) and free
    what it holds in the engine (the first end wins)."""
    if state.store.finish_session(session_id, reason, detail):
        runs, samplers = state.store.rows_of_session(session_id)
        state.engine.submit(m.Work("", m.UnloadRequest(runs, samplers)))


def set_project(state: AppState, session_id: str, project_id: str) -> None:
    with state.store.session() as db, db.begin():
        row = db.get(SessionRow, session_id)
        if row is None:  # the caller found it, so only a concurrent removal gets here
            raise HTTPException(404, f"session {session_id!r} not found")
        before, row.project_id = row.project_id, project_id
        details = {"session_id": session_id, "project_id": project_id, "previous": before}
        db.add(AuditEventRow(owner_id=row.owner_id, event="project_session_set", details=details))
