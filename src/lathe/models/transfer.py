"""Moving a step's data between host and device: pinned and non-blocking in, one transfer out.

On a GPU, `torch.tensor(values, device="cuda")` copies from pageable host memory, which
waits until the device has finished everything queued before it: a hidden sync in the middle
of a step. And every `.item()`, `float(t)` or `.cpu()` of a result waits for the device too.
So a step's inputs are made on the host in pinned memory and copied without blocking
(`to_device`), and its results come back together, in one transfer at its end (`fetch`).
On the CPU both are plain tensors and cost nothing extra.

`fetch` is the one place a step waits for the device: under
`torch.cuda.set_sync_debug_mode("error")` (the CUDA tests) any other sync raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch


def to_device(values, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A host list or array as a tensor on `device`, copied without blocking on a GPU."""
    host = torch.as_tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def fetch(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """The values of `tensors` on the host (float64, each in its own shape), in one transfer.

    float64 holds every fp32/bf16 value and every integer below 2**53 exactly.
    """
    if not tensors:
        return []
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    with expected_sync(flat.device):
        host = flat.cpu().numpy()  # the one transfer (a sync on a GPU: the step is done)
    out, at = [], 0
    for t in tensors:
        n = t.numel()
        out.append(host[at : at + n].reshape(t.shape))
        at += n
    return out


@contextlib.contextmanager
def expected_sync(device: torch.device) -> Iterator[None]:
    """A wait for the device that is meant to be there: allowed under CUDA's sync debug
    mode, which flags every other one."""
    if device.type != "cuda":
        yield
        return
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)
