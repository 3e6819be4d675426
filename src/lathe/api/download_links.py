"""Checkpoint downloads: signed URLs handed out to the key holder (see api/signed_files.py),
and the tar archive such a URL serves."""

from __future__ import annotations

import datetime as dt
import io
import tarfile
from pathlib import Path

from fastapi import HTTPException

from lathe.api import responses as r
from lathe.api.deps import Caller
from lathe.api.signed_files import ARCHIVE, DOWNLOAD_SECONDS, sign
from lathe.store import tinker_paths
from lathe.store.checkpoint_files import files_of
from lathe.store.db import utcnow


def external_weights_urls(
    caller: Caller, model_id: str, kind: str, name: str, base_url: str
) -> r.DownloadUrls:
    """One signed URL per file of an export: fetched with a plain GET, no API key."""
    if kind != "external_weights":
        raise HTTPException(
            400,
            "only external_weights checkpoints have download URLs; "
            "export with save_weights_external first",
        )
    row = caller.checkpoint(tinker_paths.format_path(model_id, kind, name))
    expires = utcnow() + dt.timedelta(seconds=DOWNLOAD_SECONDS)
    urls = {
        f: base_url + sign(caller.state.keys.secret, row.id, f, expires)
        for f in files_of(row.directory_path)
    }
    return r.DownloadUrls(urls=urls, expires=r.iso(expires))


def archive_url(caller: Caller, model_id: str, kind: str, name: str, base_url: str) -> r.ArchiveUrl:
    """SDK 0.25: one signed URL of a tar of the checkpoint's files."""
    row = caller.checkpoint(tinker_paths.format_path(model_id, kind, name))
    expires = utcnow() + dt.timedelta(seconds=DOWNLOAD_SECONDS)
    url = base_url + sign(caller.state.keys.secret, row.id, ARCHIVE, expires)
    return r.ArchiveUrl(url=url, expires=r.iso(expires))


def tar_of(directory: Path) -> bytes:
    """The checkpoint's files as one (uncompressed) tar, each under its bare file name."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for f in sorted(p for p in directory.iterdir() if p.is_file()):
            tar.add(f, arcname=f.name)
    return buffer.getvalue()
