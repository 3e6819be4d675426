"""What SDK 0.38's session-wide poller reads: each sampling session's finished samples, in
order, and the clone counter of its SamplingClient copies.

`/retrieve_futures` names a target (a sampler and a clone of its client) and the cursor it
has seen up to; it gets the completions after that cursor and acknowledges (deletes) those
at or before it. Rows are written with the future's result (db.record_completion), so every
API replica sharing the database sees the same completions whichever replica finished them.
"""

from __future__ import annotations

from sqlalchemy import delete, select, update

from lathe.store.db import SampleCompletionRow, SamplingSessionRow, Store


def completions_after(
    store: Store, sampler_id: str, clone: int, cursor: int
) -> list[SampleCompletionRow]:
    """The target's completions the poller has not seen, oldest first."""
    with store.session() as s:
        q = select(SampleCompletionRow).where(
            SampleCompletionRow.sampler_id == sampler_id,
            SampleCompletionRow.clone == clone,
            SampleCompletionRow.seq > cursor,
        )
        return list(s.scalars(q.order_by(SampleCompletionRow.seq)))


def acknowledge(store: Store, sampler_id: str, clone: int, cursor: int) -> None:
    """The poller has seen everything up to `cursor`: forget it."""
    with store.session() as s, s.begin():
        s.execute(
            delete(SampleCompletionRow).where(
                SampleCompletionRow.sampler_id == sampler_id,
                SampleCompletionRow.clone == clone,
                SampleCompletionRow.seq <= cursor,
            )
        )


def join(store: Store, sampler_id: str) -> int:
    """A new copy of the sampling session's client: its clone number (the original is 0)."""
    with store.session() as s, s.begin():
        s.execute(
            update(SamplingSessionRow)
            .where(SamplingSessionRow.sampler_id == sampler_id)
            .values(clones=SamplingSessionRow.clones + 1)
        )
        return s.scalars(
            select(SamplingSessionRow.clones).where(SamplingSessionRow.sampler_id == sampler_id)
        ).one()
