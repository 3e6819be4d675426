"""Serving signed download URLs (see api/signed_files.py). No API key: the URL is the key."""

from __future__ import annotations

import time

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, Response

from lathe.api.deps import State
from lathe.api.download_links import tar_of
from lathe.api.session_trace import trace_of
from lathe.api.signed_files import ARCHIVE, TRACE, valid
from lathe.store import checkpoint_files
from lathe.store.checkpoint_files import files_of
from lathe.store.db import CheckpointRow

router = APIRouter(tags=["downloads"])


@router.get("/files/sessions/{session_id}/{expires}/{sig}/{filename}")
def session_trace(session_id: str, expires: int, sig: str, filename: str, state: State) -> Response:
    resource = f"session-{session_id}"
    if filename != TRACE or not valid(
        state.keys.secret, resource, filename, expires, sig, time.time()
    ):
        raise HTTPException(403, "this download link is invalid or has expired; ask for a new one")
    return Response(trace_of(state.store, session_id), media_type="application/json")


@router.get("/files/{row_id}/{expires}/{sig}/{filename}")
def download(row_id: int, expires: int, sig: str, filename: str, state: State) -> Response:
    if not valid(state.keys.secret, row_id, filename, expires, sig, time.time()):
        raise HTTPException(403, "this download link is invalid or has expired; ask for a new one")
    row = state.store.get(CheckpointRow, row_id)
    if row is None or not checkpoint_files.is_complete(row.directory_path):
        raise HTTPException(404, "checkpoint not found")
    if filename == ARCHIVE:
        return Response(tar_of(row.directory_path), media_type="application/x-tar")
    if filename not in files_of(row.directory_path):
        raise HTTPException(404, f"{filename} is not part of this checkpoint")
    return FileResponse(row.directory_path / filename, media_type="application/octet-stream")
