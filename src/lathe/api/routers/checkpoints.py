"""Checkpoint listings (REST, session-less)."""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter

from lathe.api.deps import State, training_run_or_404
from lathe.api.tinker_paths import KINDS
from lathe.store.db import CheckpointRow

router = APIRouter(tags=["checkpoints"])


def iso(t: dt.datetime) -> str:
    if t.tzinfo is None:  # SQLite hands back naive datetimes; they are stored in UTC
        t = t.replace(tzinfo=dt.UTC)
    return t.isoformat().replace("+00:00", "Z")


def checkpoint_json(row: CheckpointRow) -> dict:
    return {
        "checkpoint_id": f"{row.kind}/{row.name}",
        "checkpoint_type": KINDS[row.kind],
        "time": iso(row.created_at),
        "tinker_path": row.tinker_path,
        "size_bytes": row.size_bytes,
        "public": False,
    }


@router.get("/training_runs/{model_id}/checkpoints")
def list_checkpoints(model_id: str, state: State) -> dict:
    training_run_or_404(state, model_id)
    return {"checkpoints": [checkpoint_json(r) for r in state.store.checkpoints_of(model_id)]}
