"""Fault injection for durability tests, off unless LATHE_FAULTS is set.

LATHE_FAULTS="save_delay=2" sleeps 2 s after a checkpoint's files are written and before it
is renamed into place (time to kill the server mid-save); "save_error=ENOSPC" makes writing a
checkpoint fail as a full disk does.
"""

from __future__ import annotations

import os


def fault(name: str) -> str | None:
    for item in os.environ.get("LATHE_FAULTS", "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == name:
            return value.strip()
    return None
