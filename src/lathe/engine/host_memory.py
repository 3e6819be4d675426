"""Keep big CPU tensors' memory in the process heap between training steps.

PyTorch's CPU allocator takes every tensor from malloc. glibc serves allocations above its
mmap threshold (at most 32 MB) with fresh pages from the kernel and unmaps them on free, so
each step's large activations and logits pay page faults and zeroing again, every step: a
co-batched step over several adapters, whose tensors are larger, paid up to a tenth of its
time for it. Turning mmap off for malloc (and not trimming the heap) lets freed blocks be
reused. The cost: memory freed after a peak stays with the process (the peak is what the
server needs anyway). Only glibc has `mallopt`; elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """True if glibc now keeps large freed blocks for reuse."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    if not ok:
        log.warning("mallopt refused; large CPU tensors keep being mapped per allocation")
    return ok
