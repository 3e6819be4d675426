"""POST /sessions/search (SDK 0.38's RestClient.search_sessions): a user's sessions, newest
first, filtered and paged by a (created_at, session_id) cursor.

Users see only their own sessions (lathe has no teams): "accessible" means the caller's, and
"user" matches only when it names the caller. A session's status is "active" until it ends;
then "client_finished" with the reason the client gave, or "cancelled" when its heartbeats
stopped.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from lathe.api import responses as r
from lathe.api import schemas as s
from lathe.api.deps import Caller
from lathe.store.db import CheckpointRow, SessionRow, TrainingRunRow, as_utc, live


def search(caller: Caller, body: s.SessionSearch) -> r.SessionSearchPage:
    owner = body.owner
    if owner.type == "user" and caller.user.name not in owner.owner_urns:
        return r.SessionSearchPage(sessions=[])  # other users' sessions are never listed
    with caller.state.store.session() as db:
        q = select(SessionRow).where(SessionRow.owner_id == caller.user_id)
        if body.project_ids is not None:
            q = q.where(SessionRow.project_id.in_(body.project_ids))
        rows = list(db.scalars(q))
    rows = [row for row in rows if matches(row, body)]
    rows.sort(key=lambda row: (as_utc(row.created_at), row.session_id), reverse=True)
    if body.cursor is not None:
        after = (as_utc(body.cursor.last_created_at), body.cursor.last_session_id)
        rows = [row for row in rows if (as_utc(row.created_at), row.session_id) < after]
    page, more = rows[: body.limit], len(rows) > body.limit
    counts = checkpoint_counts(caller, [row.session_id for row in page])
    sessions = [
        r.SessionSummary(
            session_id=row.session_id,
            created_at=r.iso(row.created_at),
            owner=caller.user.name,
            project_id=row.project_id or "",
            status=status_of(row),
            checkpoints_count=counts.get(row.session_id, (0, 0))[0],
            checkpoint_storage_bytes=counts.get(row.session_id, (0, 0))[1],
            display_name=row.display_name,
            user_metadata=r.str_metadata(row.user_metadata),
        )
        for row in page
    ]
    cursor = None
    if more:
        last = page[-1]
        cursor = {"last_created_at": r.iso(last.created_at), "last_session_id": last.session_id}
    return r.SessionSearchPage(sessions=sessions, next_cursor=cursor)


def matches(row: SessionRow, body: s.SessionSearch) -> bool:
    """The filters the database query left to Python: identity, metadata and status."""
    if body.session_id is not None or body.display_name is not None:
        by_id = row.session_id == body.session_id
        name = (row.display_name or "").lower()
        words = (body.display_name or "").lower().split()
        by_name = body.display_name is not None and all(w in name for w in words)
        if not (by_id or by_name):  # with both given, either one matches
            return False
    metadata = r.str_metadata(row.user_metadata)
    if any(metadata.get(k) != v for k, v in body.user_metadata.items()):
        return False
    if body.statuses is not None:
        status = status_of(row)
        return any(wanted(status, q) for q in body.statuses)
    return True


def status_of(row: SessionRow) -> dict[str, Any]:
    if row.finished_at is None:
        return {"type": "active"}
    if row.end_reason == "expired":
        return {"type": "cancelled", "detail": row.end_detail}
    reason = row.end_reason if row.end_reason in ("errored", "interrupted") else "success"
    return {"type": "client_finished", "reason": {"type": reason}, "detail": row.end_detail}


def wanted(status: dict[str, Any], query: s.StatusQuery) -> bool:
    if status["type"] != query.type:
        return False
    if query.type == "client_finished" and query.reasons:
        return status["reason"]["type"] in query.reasons
    return True


def checkpoint_counts(caller: Caller, session_ids: list[str]) -> dict[str, tuple[int, int]]:
    """Per session: its runs' live checkpoints and their bytes."""
    with caller.state.store.session() as db:
        q = (
            select(
                TrainingRunRow.session_id,
                func.count(CheckpointRow.id),
                func.coalesce(func.sum(CheckpointRow.size_bytes), 0),
            )
            .join(CheckpointRow, CheckpointRow.model_id == TrainingRunRow.model_id)
            .where(TrainingRunRow.session_id.in_(session_ids), live())
            .group_by(TrainingRunRow.session_id)
        )
        return {sid: (int(n), int(size)) for sid, n, size in db.execute(q)}
