"""Checkpoints over REST: listings, delete, publish, TTL, downloads and copies."""

from __future__ import annotations

import datetime as dt
import shutil

from fastapi import APIRouter, HTTPException, Query, Request

from lathe.api import schemas as s
from lathe.api.deps import CallerDep
from lathe.api.signed_files import ARCHIVE, DOWNLOAD_SECONDS, sign
from lathe.store import tinker_paths
from lathe.store.atomic import atomic_dir
from lathe.store.checkpoint_files import files_of
from lathe.store.db import CheckpointRow, SessionRow, TrainingRunRow, utcnow
from lathe.store.tinker_paths import KINDS

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
        "user_metadata": {k: str(v) for k, v in (row.user_metadata or {}).items()},
        "expires_at": iso(row.expires_at) if row.expires_at else None,
    }


def base_url(request: Request) -> str:
    """Where the client reached us (signed URLs must point back there), without the API path."""
    return str(request.base_url).rstrip("/")


def cursor(offset: int, limit: int, total: int) -> dict:
    return {"offset": offset, "limit": limit, "total_count": total}


@router.get("/training_runs/{model_id}/checkpoints")
def list_checkpoints(model_id: str, caller: CallerDep) -> dict:
    caller.training_run(model_id)
    rows = caller.state.store.checkpoints_of(model_id)
    return {"checkpoints": [checkpoint_json(r) for r in rows]}


@router.get("/checkpoints")
def list_user_checkpoints(
    caller: CallerDep, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)
) -> dict:
    """Every checkpoint of the caller, newest first, a page at a time."""
    rows, total = caller.state.store.checkpoints_of_user(caller.user_id, limit, offset)
    return {
        "checkpoints": [checkpoint_json(r) for r in rows],
        "cursor": cursor(offset, limit, total),
    }


@router.delete("/training_runs/{model_id}/checkpoints/{kind}/{name}")
def delete_checkpoint(model_id: str, kind: str, name: str, caller: CallerDep) -> dict:
    row = caller.checkpoint(tinker_paths.format_path(model_id, kind, name), write=True)
    caller.state.store.remove_checkpoint(row)
    return {}


@router.post("/training_runs/{model_id}/checkpoints/{kind}/{name}/publish")
def publish_checkpoint(model_id: str, kind: str, name: str, caller: CallerDep) -> dict:
    row = caller.checkpoint(tinker_paths.format_path(model_id, kind, name), write=True)
    caller.state.store.set_public(row.id, True)
    return {}


@router.delete("/training_runs/{model_id}/checkpoints/{kind}/{name}/publish")
def unpublish_checkpoint(model_id: str, kind: str, name: str, caller: CallerDep) -> dict:
    row = caller.checkpoint(tinker_paths.format_path(model_id, kind, name), write=True)
    caller.state.store.set_public(row.id, False)
    return {}


@router.put("/training_runs/{model_id}/checkpoints/{kind}/{name}/ttl")
def set_ttl(model_id: str, kind: str, name: str, body: s.CheckpointTtl, caller: CallerDep) -> dict:
    row = caller.checkpoint(tinker_paths.format_path(model_id, kind, name), write=True)
    if body.ttl_seconds is not None and not 1 <= body.ttl_seconds <= 10 * 365 * 86400:
        raise HTTPException(
            400, f"ttl_seconds must be between 1 and 10 years or null, got {body.ttl_seconds}"
        )
    expires = (
        None if body.ttl_seconds is None else (utcnow() + dt.timedelta(seconds=body.ttl_seconds))
    )
    caller.state.store.set_expiry(row.id, expires)
    return {}


@router.get("/training_runs/{model_id}/checkpoints/{kind}/{name}/external_weights_urls")
def external_weights_urls(
    model_id: str, kind: str, name: str, caller: CallerDep, request: Request
) -> dict:
    """Signed URLs of an export's files: fetched with a plain GET, no API key, as the CLI does."""
    if kind != "external_weights":
        raise HTTPException(
            400,
            "only external_weights checkpoints have download URLs; "
            "export with save_weights_external first",
        )
    row = caller.checkpoint(tinker_paths.format_path(model_id, kind, name))
    expires = utcnow() + dt.timedelta(seconds=DOWNLOAD_SECONDS)
    base = base_url(request)
    urls = {
        f: base + sign(caller.state.keys.secret, row.id, f, expires)
        for f in files_of(row.directory_path)
    }
    return {"urls": urls, "expires": iso(expires)}


@router.get("/training_runs/{model_id}/checkpoints/{kind}/{name}/archive")
def archive(model_id: str, kind: str, name: str, caller: CallerDep, request: Request) -> dict:
    """SDK 0.25: one signed URL of a tar of the checkpoint's files."""
    row = caller.checkpoint(tinker_paths.format_path(model_id, kind, name))
    expires = utcnow() + dt.timedelta(seconds=DOWNLOAD_SECONDS)
    url = base_url(request) + sign(caller.state.keys.secret, row.id, ARCHIVE, expires)
    return {"url": url, "expires": iso(expires)}


@router.post("/copy_weights")
def copy_weights(body: s.CopyWeights, caller: CallerDep) -> dict:
    """Copy a checkpoint (the caller's, or a published one) into a new run of the caller's."""
    src = caller.checkpoint(body.source_path)
    store = caller.state.store
    source_run = store.get(TrainingRunRow, src.model_id)
    session_id = tinker_paths.new_session_id()
    model_id = tinker_paths.model_id_for(session_id, 0)
    store.add(
        SessionRow(
            session_id=session_id,
            owner_id=caller.user_id,
            project_id=body.destination_project_id,
            finished_at=utcnow(),
            user_metadata={"copied_from": body.source_path},
        )
    )
    store.add(
        TrainingRunRow(
            model_id=model_id,
            owner_id=caller.user_id,
            session_id=session_id,
            base_model=source_run.base_model,
            lora_rank=source_run.lora_rank,
            train_attn=source_run.train_attn,
            train_mlp=source_run.train_mlp,
            train_unembed=source_run.train_unembed,
        )
    )
    dst = tinker_paths.checkpoint_dir(
        caller.state.settings.checkpoint_dir, model_id, src.kind, src.name
    )
    with atomic_dir(dst) as tmp:
        shutil.copytree(src.directory_path, tmp, dirs_exist_ok=True)
    expires = (
        None if body.ttl_seconds is None else (utcnow() + dt.timedelta(seconds=body.ttl_seconds))
    )
    store.upsert_checkpoint(
        model_id,
        caller.user_id,
        src.kind,
        src.name,
        str(dst),
        src.size_bytes,
        expires,
        src.user_metadata,
    )
    return {"tinker_path": tinker_paths.format_path(model_id, src.kind, src.name)}
