"""Server-side custom losses (SDK 0.38 `create_custom_loss`): checked, stored per session.

The graph is checked when it arrives (allowlist and structure here, then a trial run on meta
tensors in the engine that computes nothing), so a hostile graph is refused with a 400 before
any training step.
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException

from lathe.api import responses as r
from lathe.api import schemas as s
from lathe.api.deps import Caller
from lathe.api.state import AppState
from lathe.api.submit import JSON, fingerprint
from lathe.protocol import messages as m
from lathe.protocol.loss_graph import LossGraph, LossGraphError, parse_graph
from lathe.store import tinker_paths
from lathe.store.db import CustomLossRow

CHECK_TIMEOUT_S = 30.0  # the engine's trial run takes milliseconds; this covers a busy engine


def parse(
    state: AppState, name: str, inputs: list[dict[str, Any]], graph: dict[str, Any]
) -> LossGraph:
    """Structure and allowlist here; the trial run (torch, on meta tensors) in the engine."""
    try:
        parsed = parse_graph(name, inputs, graph)
    except LossGraphError as e:
        raise HTTPException(400, f"custom loss {name!r} refused: {e}") from None
    done = state.engine.call(m.CheckLossRequest(parsed), CHECK_TIMEOUT_S)
    if done.error is not None:
        raise HTTPException(400 if done.category == "user" else 503, done.error)
    return parsed


def create_custom_loss(caller: Caller, body: s.CreateCustomLoss) -> r.Queued:
    """Check and store the loss; its future is complete at once (nothing runs later)."""
    state = caller.state
    caller.session(body.session_id)
    loss_id = tinker_paths.loss_id_for(body.session_id, body.custom_loss_seq_id)
    graph = parse(state, body.name, body.inputs, body.graph)
    request_id, created = state.futures.create(
        "create_custom_loss", f"loss:{loss_id}", None, caller.user_id, fingerprint(body)
    )
    if created:
        state.store.add(
            CustomLossRow(
                loss_id=loss_id,
                owner_id=caller.user_id,
                session_id=body.session_id,
                name=body.name,
                inputs=body.inputs,
                graph=body.graph,
            )
        )
        state.custom_losses[loss_id] = graph
        state.futures.complete_now(
            request_id, JSON, r.CustomLossCreated(loss_id=loss_id).model_dump()
        )
    return r.Queued(request_id=request_id)


def graph_of(caller: Caller, loss_id: str, session_id: str) -> LossGraph | None:
    """The caller's loss with this id, if made in this session (losses are session-private)."""
    row = caller.custom_loss(loss_id)
    if row.session_id != session_id:
        return None
    cache = caller.state.custom_losses
    if loss_id not in cache:  # e.g. after a restart
        cache[loss_id] = parse(caller.state, row.name, row.inputs, row.graph)
    return cache[loss_id]
