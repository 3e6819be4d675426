"""Checkpoint expiry: a TTL in seconds from a request, checked and turned into a time."""

from __future__ import annotations

import datetime as dt

from fastapi import HTTPException

from lathe.store.db import utcnow

MAX_TTL_SECONDS = 10 * 365 * 86400  # ten years; the SDK documents 3600 s and up


def check_ttl(ttl_seconds: int | None, *, null_removes: bool = False) -> None:
    """A 400 for a TTL out of range (`null_removes`: the message says null is allowed too)."""
    if ttl_seconds is not None and not 1 <= ttl_seconds <= MAX_TTL_SECONDS:
        allowed = "between 1 and 10 years" + (" or null" if null_removes else "")
        raise HTTPException(400, f"ttl_seconds must be {allowed}, got {ttl_seconds}")


def expires_after(ttl_seconds: int | None) -> dt.datetime | None:
    """When a checkpoint given this TTL now expires (None: never)."""
    return None if ttl_seconds is None else utcnow() + dt.timedelta(seconds=ttl_seconds)
