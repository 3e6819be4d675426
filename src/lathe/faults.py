"""Fault injection for durability tests, off unless LATHE_FAULTS is set.

LATHE_FAULTS="save_delay=2" sleeps 2 s after a checkpoint's files are written and before it
is renamed into place (time to kill the server mid-save); "save_error=ENOSPC" makes writing a
checkpoint fail as a full disk does; "crash_at=POINT,crash_once=FILE" makes the engine process
die on the spot (no cleanup, as a crash does) when it reaches POINT (forward_backward,
optim_step or save), once: FILE marks that it has, so the restarted engine goes on.
"""

from __future__ import annotations

import os


def fault(name: str) -> str | None:
    for item in os.environ.get("LATHE_FAULTS", "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == name:
            return value.strip()
    return None


def crash_point(name: str) -> None:
    """Die here if LATHE_FAULTS says to crash at `name` (and has not yet, with crash_once)."""
    if fault("crash_at") != name:
        return
    if marker := fault("crash_once"):
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:  # crashed here before
            return
    os._exit(70)
