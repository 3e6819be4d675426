"""Atomic, durable folder writes: fill a temporary sibling, flush it, rename it into place.

Every folder lathe writes for others to read (checkpoints, merged models, tiny models, hub-cache
snapshots) goes through `atomic_dir`, so a reader or a crash never sees half of one. Leftover
temporary folders are named `.<name>.tmp-<hex>` (checkpoint_files.sweep_unfinished removes them).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(directory: Path) -> Iterator[Path]:
    """A fresh temporary sibling of `directory` to fill; flushed and renamed onto `directory`
    on success.

    An existing `directory` is replaced; on any error the temporary folder is removed.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_all(tmp)
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_all(folder: Path) -> int:
    """Flush every file of `folder` to disk; returns their total size in bytes."""
    for f in folder.iterdir():
        fsync_file(f)
    return sum(f.stat().st_size for f in folder.iterdir())


def fsync_file(path: Path) -> None:
    """Flush a file, or a folder's entries (after a rename into it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(src: Path, dst: Path) -> None:
    """Move `src` to `dst`; an existing `dst` is swapped out first and removed after."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex}"
        dst.rename(old)
    src.rename(dst)
    fsync_file(dst.parent)  # the rename itself
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
