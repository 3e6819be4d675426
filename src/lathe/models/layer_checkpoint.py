"""Activation checkpointing per decoder layer, applied to a model from outside.

A training step keeps every layer's activations for the backward pass: memory grows with the
tokens of a micro-batch times the layers, which caps the context a request may have. With
checkpointing, a layer keeps only its input and runs its forward again when the backward
pass reaches it (`torch.utils.checkpoint`): about a third more compute for activations of one
layer at a time. `checkpoint_layers(model)` prepares a model once; whether a forward pass
checkpoints is chosen per pass with `checkpointing(True)`, so short micro-batches keep their
activations and run at full speed. The numbers are the same either way: the recomputed
forward is the same computation.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_on: contextvars.ContextVar[bool] = contextvars.ContextVar("lathe_checkpoint", default=False)


@contextlib.contextmanager
def checkpointing(on: bool) -> Iterator[None]:
    """Forward passes inside the block checkpoint each decoder layer if `on` (and gradients
    are being recorded)."""
    token = _on.set(on)
    try:
        yield
    finally:
        _on.reset(token)


def checkpoint_layers(model: nn.Module) -> None:
    """Make each decoder layer of `model` (`model.model.layers`) checkpoint its activations
    when the pass asks for it; once per model."""
    for block in model.model.layers:
        block.forward = _checkpointed(block.forward)


def _checkpointed(forward):
    def run(*args):
        if _on.get() and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False)
        return forward(*args)

    return run
