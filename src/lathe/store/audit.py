"""A user's audit log (GET /audit, SDK 0.38 AdminClient.get_audit_log): the changes to their
checkpoints (create, delete by request / TTL / admin, publish, unpublish, TTL) and to their
sessions' projects, one UTC day at a time. Events are written in the transaction of the change
itself (db.audit_checkpoint), so the log and the data never disagree.

lathe has no teams or organisations: those event types are always empty.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import or_, select

from lathe.store.db import AuditEventRow, Store

PREFIXES = {  # event_type -> the events it covers
    "all": ("checkpoint_", "project_"),
    "checkpoints": ("checkpoint_",),
    "projects": ("project_",),
    "teams": (),
    "organizations": (),
}


def events_of(store: Store, owner_id: int, event_type: str, day: dt.date) -> list[AuditEventRow]:
    """The owner's events of one type on one UTC day, oldest first."""
    prefixes = PREFIXES[event_type]
    if not prefixes:
        return []
    start = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
    with store.session() as s:
        q = select(AuditEventRow).where(
            AuditEventRow.owner_id == owner_id,
            AuditEventRow.at >= start,
            AuditEventRow.at < start + dt.timedelta(days=1),
            or_(*(AuditEventRow.event.startswith(p) for p in prefixes)),
        )
        return list(s.scalars(q.order_by(AuditEventRow.at, AuditEventRow.id)))
