"""Checkpoint listings (REST, session-less)."""

from __future__ import annotations

import datetime as dt
import shutil

from fastapi import APIRouter

from lathe.api.deps import CallerDep
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
        "public": row.public,
    }


@router.get("/training_runs/{model_id}/checkpoints")
def list_checkpoints(model_id: str, caller: CallerDep) -> dict:
    caller.training_run(model_id)
    rows = caller.state.store.checkpoints_of(model_id)
    return {"checkpoints": [checkpoint_json(r) for r in rows]}


def checkpoint_path(model_id: str, checkpoint_id: str) -> str:
    return f"tinker://{model_id}/{checkpoint_id}"


@router.delete("/training_runs/{model_id}/checkpoints/{kind}/{name}")
def delete_checkpoint(model_id: str, kind: str, name: str, caller: CallerDep) -> dict:
    row = caller.checkpoint(checkpoint_path(model_id, f"{kind}/{name}"), write=True)
    caller.state.store.delete_checkpoint(row.id)
    shutil.rmtree(row.directory_path, ignore_errors=True)
    return {}


@router.post("/training_runs/{model_id}/checkpoints/{kind}/{name}/publish")
def publish_checkpoint(model_id: str, kind: str, name: str, caller: CallerDep) -> dict:
    row = caller.checkpoint(checkpoint_path(model_id, f"{kind}/{name}"), write=True)
    caller.state.store.set_public(row.id, True)
    return {}


@router.delete("/training_runs/{model_id}/checkpoints/{kind}/{name}/publish")
def unpublish_checkpoint(model_id: str, kind: str, name: str, caller: CallerDep) -> dict:
    row = caller.checkpoint(checkpoint_path(model_id, f"{kind}/{name}"), write=True)
    caller.state.store.set_public(row.id, False)
    return {}
