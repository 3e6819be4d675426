"""Download URLs that need no API key: signed with the server secret and expiring.

The SDK's CLI fetches checkpoint files with plain GETs of the URLs `external_weights_urls`
(and SDK 0.25's `archive`) hand out. A URL names one file of one checkpoint and an expiry,
and carries an HMAC of the three; it cannot be altered to reach anything else.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac

DOWNLOAD_SECONDS = 3600  # the CLI re-signs when less than 5 minutes remain
ARCHIVE = "archive.tar"  # the whole checkpoint folder as one tar


def signature(secret: bytes, row_id: int, filename: str, expires: int) -> str:
    message = f"{row_id}:{filename}:{expires}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign(secret: bytes, row_id: int, filename: str, expires: dt.datetime) -> str:
    """The URL path (after the server's base URL) of one file of one checkpoint."""
    stamp = int(expires.timestamp())
    return f"/api/v1/files/{row_id}/{stamp}/{signature(secret, row_id, filename, stamp)}/{filename}"


def valid(secret: bytes, row_id: int, filename: str, expires: int, sig: str, now: float) -> bool:
    expected = signature(secret, row_id, filename, expires)
    return hmac.compare_digest(expected, sig) and now < expires
