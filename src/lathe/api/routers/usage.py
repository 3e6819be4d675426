"""What SDK 0.38's AdminClient reads: the caller's checkpoint storage as it stands now, and
the caller's audit log (store/audit.py).

A self-hosted server bills nobody, so the cost fields stay empty; the counts and sizes are
what `--limit max_checkpoint_bytes` is checked against.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from fastapi import APIRouter, Query
from sqlalchemy import func, select

from lathe.api import responses as r
from lathe.api.deps import CallerDep
from lathe.store import audit
from lathe.store.db import CheckpointRow, SessionRow, TrainingRunRow, live

router = APIRouter(tags=["usage"])

GIGABYTE = 10**9  # the storage billing unit of the SDK's size_gigabytes


@router.get("/billing/usage/checkpoints/current")
def current_checkpoint_storage(
    caller: CallerDep, project_id: str | None = Query(None, max_length=256)
) -> r.CheckpointStorage:
    """The caller's live checkpoints by project of their session (optionally one project)."""
    q = (
        select(
            SessionRow.project_id, func.count(CheckpointRow.id), func.sum(CheckpointRow.size_bytes)
        )
        .join(TrainingRunRow, TrainingRunRow.model_id == CheckpointRow.model_id)
        .join(SessionRow, SessionRow.session_id == TrainingRunRow.session_id)
        .where(CheckpointRow.owner_id == caller.user_id, live())
        .group_by(SessionRow.project_id)
        .order_by(SessionRow.project_id)
    )
    if project_id is not None:
        q = q.where(SessionRow.project_id == project_id)
    with caller.state.store.session() as db:
        rows = db.execute(q).all()
    return r.CheckpointStorage(
        data=[
            r.CheckpointStorageItem(
                project_id=project,
                user_name=caller.user.name,
                checkpoint_count=int(count),
                size_bytes=int(size or 0),
                size_gigabytes=int(size or 0) / GIGABYTE,
            )
            for project, count, size in rows
        ]
    )


@router.get("/audit")
def audit_log(
    caller: CallerDep,
    event_type: Literal["all", "checkpoints", "projects", "teams", "organizations"] = "all",
    day: dt.date | None = None,
) -> r.AuditLog:
    """The caller's events of one UTC day (default today), oldest first."""
    when = day or dt.datetime.now(dt.UTC).date()
    rows = audit.events_of(caller.state.store, caller.user_id, event_type, when)
    return r.AuditLog(
        entries=[
            r.AuditEntry(
                timestamp=r.iso(row.at),
                event=row.event,
                event_details=row.details,
                model_id=row.model_id,
                tinker_path=row.tinker_path,
            )
            for row in rows
        ]
    )
