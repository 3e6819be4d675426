"""Download URLs that need no API key: signed with the server secret and expiring.

The SDK's CLI fetches checkpoint files with plain GETs of the URLs `external_weights_urls`
(and SDK 0.25's `archive`) hand out, and session traces from `trace_export`'s. A URL names one
file of one checkpoint (by row id) or of one session (`session-<id>`) and an expiry, and
carries an HMAC of the three; it cannot be altered to reach anything else.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac

DOWNLOAD_SECONDS = 3600  # the CLI re-signs when less than 5 minutes remain
ARCHIVE = "archive.tar"  # the whole checkpoint folder as one tar


TRACE = "trace.json"  # a session's timeline (api/session_trace.py)


def signature(secret: bytes, resource: int | str, filename: str, expires: int) -> str:
    message = f"{resource}:{filename}:{expires}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign(secret: bytes, row_id: int, filename: str, expires: dt.datetime) -> str:
    """The URL path (after the server's base URL) of one file of one checkpoint."""
    stamp = int(expires.timestamp())
    return f"/api/v1/files/{row_id}/{stamp}/{signature(secret, row_id, filename, stamp)}/{filename}"


def sign_trace(secret: bytes, session_id: str, expires: dt.datetime) -> str:
    """The URL path of a session's trace."""
    stamp = int(expires.timestamp())
    sig = signature(secret, f"session-{session_id}", TRACE, stamp)
    return f"/api/v1/files/sessions/{session_id}/{stamp}/{sig}/{TRACE}"


def valid(
    secret: bytes, resource: int | str, filename: str, expires: int, sig: str, now: float
) -> bool:
    expected = signature(secret, resource, filename, expires)
    return hmac.compare_digest(expected, sig) and now < expires
