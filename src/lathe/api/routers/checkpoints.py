"""Checkpoints over REST: listings, delete, publish, TTL, downloads and copies."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from lathe.api import checkpoint_copies, download_links
from lathe.api import responses as r
from lathe.api import schemas as s
from lathe.api.checkpoint_ttl import check_ttl, expires_after
from lathe.api.deps import CallerDep
from lathe.store import tinker_paths

router = APIRouter(tags=["checkpoints"])


def base_url(request: Request) -> str:
    """Where the client reached us (signed URLs must point back there), without the API path."""
    return str(request.base_url).rstrip("/")


@router.get("/training_runs/{model_id}/checkpoints")
def list_checkpoints(model_id: str, caller: CallerDep) -> r.RunCheckpoints:
    caller.training_run(model_id)
    rows = caller.state.store.checkpoints_of(model_id)
    return r.RunCheckpoints(checkpoints=[r.Checkpoint.of(row) for row in rows])


@router.get("/checkpoints")
def list_user_checkpoints(
    caller: CallerDep, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)
) -> r.UserCheckpoints:
    """Every checkpoint of the caller, newest first, a page at a time."""
    rows, total = caller.state.store.checkpoints_of_user(caller.user_id, limit, offset)
    return r.UserCheckpoints(
        checkpoints=[r.Checkpoint.of(row) for row in rows],
        cursor=r.Cursor(offset=offset, limit=limit, total_count=total),
    )


@router.delete("/training_runs/{model_id}/checkpoints/{kind}/{name}")
def delete_checkpoint(model_id: str, kind: str, name: str, caller: CallerDep) -> r.Empty:
    row = caller.checkpoint(tinker_paths.format_path(model_id, kind, name), write=True)
    caller.state.store.remove_checkpoint(row)
    return r.Empty()


@router.post("/training_runs/{model_id}/checkpoints/{kind}/{name}/publish")
def publish_checkpoint(model_id: str, kind: str, name: str, caller: CallerDep) -> r.Empty:
    row = caller.checkpoint(tinker_paths.format_path(model_id, kind, name), write=True)
    caller.state.store.set_public(row.id, True)
    return r.Empty()


@router.delete("/training_runs/{model_id}/checkpoints/{kind}/{name}/publish")
def unpublish_checkpoint(model_id: str, kind: str, name: str, caller: CallerDep) -> r.Empty:
    row = caller.checkpoint(tinker_paths.format_path(model_id, kind, name), write=True)
    caller.state.store.set_public(row.id, False)
    return r.Empty()


@router.put("/training_runs/{model_id}/checkpoints/{kind}/{name}/ttl")
def set_ttl(
    model_id: str, kind: str, name: str, body: s.CheckpointTtl, caller: CallerDep
) -> r.Empty:
    row = caller.checkpoint(tinker_paths.format_path(model_id, kind, name), write=True)
    check_ttl(body.ttl_seconds, null_removes=True)
    caller.state.store.set_expiry(row.id, expires_after(body.ttl_seconds))
    return r.Empty()


@router.get("/training_runs/{model_id}/checkpoints/{kind}/{name}/external_weights_urls")
def external_weights_urls(
    model_id: str, kind: str, name: str, caller: CallerDep, request: Request
) -> r.DownloadUrls:
    """Signed URLs of an export's files: fetched with a plain GET, no API key, as the CLI does."""
    return download_links.external_weights_urls(caller, model_id, kind, name, base_url(request))


@router.get("/training_runs/{model_id}/checkpoints/{kind}/{name}/archive")
def archive(
    model_id: str, kind: str, name: str, caller: CallerDep, request: Request
) -> r.ArchiveUrl:
    """SDK 0.25: one signed URL of a tar of the checkpoint's files."""
    return download_links.archive_url(caller, model_id, kind, name, base_url(request))


@router.post("/copy_weights")
def copy_weights(body: s.CopyWeights, caller: CallerDep) -> r.CopiedWeights:
    """Copy a checkpoint (the caller's, or a published one) into a new run of the caller's."""
    return checkpoint_copies.copy_weights(caller, body)
