"""The decoder's elementwise parts as plain functions, and `torch.compile` of them.

RMSNorm, RoPE and the SwiGLU product are a handful of elementwise kernels each when run
eagerly; compiled, each becomes one fused kernel, which on a GPU removes most of a small
model's launches and memory round trips. The matmuls and the attention are left to their
own kernels, so the row-invariant matmuls (models/lora.py) and the paged attention
(sampling/paged_attention.py) are untouched.

Compiling is a per-model choice (`compile_elementwise`): the modules of a model keep the
function they call as an attribute, eager by default. Shapes are compiled dynamic, so one
graph serves every token count (torch specialises sizes 0 and 1 only): recompiles stay
bounded without padding batches to shape buckets. Measured on a 2-core CPU, compiling did
not pay (decode and training steps within noise, ~15 s of compiling), hence `auto` = CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 as the reference implementation does, then cast back.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, H, T, D); cos/sin (B, 1, T, D). Rotate-half convention of the HF checkpoints.
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def compile_wanted(mode: str, device: str) -> bool:
    """Whether `--compile MODE` (auto | on | off) compiles on `device`: auto = CUDA only."""
    return mode == "on" or (mode == "auto" and device.startswith("cuda"))


def compile_elementwise(model: nn.Module) -> None:
    """Make every module of `model` that calls one of the functions above call it compiled."""
    compiled = {
        fn.__name__: torch.compile(fn, dynamic=True, fullgraph=True)
        for fn in (rms_norm, rope, swiglu)
    }
    for module in model.modules():
        for name in compiled.keys() & vars(module).keys():
            setattr(module, name, compiled[name])
