"""What SDK 0.38's AdminClient reads: the caller's usage per hour (api/usage_accounting.py),
checkpoint storage as it stands now, and audit log (store/audit.py).

A self-hosted server bills nobody, so the cost fields stay empty; the counts and sizes are
what `--limit max_checkpoint_bytes` is checked against.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from fastapi import APIRouter, HTTPException, Query
from sqlalchemy import func, select

from lathe.api import responses as r
from lathe.api.deps import CallerDep
from lathe.store import audit
from lathe.store.db import (
    AuditEventRow,
    CheckpointRow,
    SessionRow,
    TrainingRunRow,
    UsageRow,
    as_utc,
    live,
    utcnow,
)

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


MAX_WINDOW = dt.timedelta(days=14)


@router.get("/billing/usage/events")
def billing_usage(
    caller: CallerDep, starting_on: dt.datetime, ending_before: dt.datetime
) -> r.BillingUsage:
    """The caller's usage in hourly buckets: training, prefill (cached apart) and sampled
    tokens, and checkpoints saved. Storage over time is not accounted; no prices."""
    start, end = as_utc(starting_on), as_utc(ending_before)
    if start.minute or start.second or start.microsecond or end.minute or end.second:
        raise HTTPException(400, "starting_on and ending_before must be whole UTC hours")
    if not start < end <= start + MAX_WINDOW or start > utcnow():
        raise HTTPException(400, "the window must be 1 hour to 14 days, starting in the past")
    buckets: dict[tuple, int] = {}
    sessions: set[str] = set()
    with caller.state.store.session() as db:
        used = db.scalars(
            select(UsageRow).where(
                UsageRow.owner_id == caller.user_id, UsageRow.at >= start, UsageRow.at < end
            )
        )
        for row in used:
            key = (floor_hour(row.at), row.session_id, row.base_model, row.event, row.cached)
            buckets[key] = buckets.get(key, 0) + row.count
        saved = db.execute(
            select(AuditEventRow.at, TrainingRunRow.session_id, TrainingRunRow.base_model)
            .join(TrainingRunRow, TrainingRunRow.model_id == AuditEventRow.model_id)
            .where(
                AuditEventRow.owner_id == caller.user_id,
                AuditEventRow.event == "checkpoint_create",
                AuditEventRow.at >= start,
                AuditEventRow.at < end,
            )
        )
        for at, session_id, base_model in saved:
            key = (floor_hour(at), session_id, base_model, "checkpoint", False)
            buckets[key] = buckets.get(key, 0) + 1
        sessions = {key[1] for key in buckets if key[1]}
        meta = {
            row.session_id: (row.user_metadata, row.project_id)
            for row in db.scalars(select(SessionRow).where(SessionRow.session_id.in_(sessions)))
        }
    events = []
    for (bucket, session_id, base_model, event, cached), count in sorted(
        buckets.items(), key=lambda item: (item[0][0], str(item[0][1]), item[0][3])
    ):
        info: dict = {"type": event}
        if event == "checkpoint":
            info["count"] = count
        else:
            info["token_count"] = count
        if event == "sampling_prefill":
            info["cached"] = cached
        events.append(
            r.BillingEvent(
                bucket_start=r.iso(bucket),
                bucket_end=r.iso(bucket + dt.timedelta(hours=1)),
                base_model=base_model,
                user_name=caller.user.name,
                session_id=session_id,
                project_id=meta.get(session_id, (None, None))[1] if session_id else None,
                event_info=info,
            )
        )
    return r.BillingUsage(
        data=events,
        sessions={
            sid: {"user_metadata": r.str_metadata(metadata)} for sid, (metadata, _) in meta.items()
        },
    )


def floor_hour(t: dt.datetime) -> dt.datetime:
    return as_utc(t).replace(minute=0, second=0, microsecond=0)
