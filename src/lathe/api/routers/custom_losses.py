"""Server-side custom losses (SDK 0.38 `create_custom_loss`): stored per session.

The graph is checked when it arrives (allowlist, structure, and a trial run on meta tensors
that computes nothing), so a hostile graph is refused with a 400 before any training step.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException

from lathe.api import schemas as s
from lathe.api.deps import Caller, CallerDep
from lathe.api.submit import JSON, fingerprint
from lathe.engine.custom_loss import FUNCTIONS, trial_run
from lathe.protocol.loss_graph import LossGraph, LossGraphError, parse_graph
from lathe.store import tinker_paths
from lathe.store.db import CustomLossRow

router = APIRouter(tags=["custom losses"])


def parse(name: str, inputs: list[dict[str, Any]], graph: dict[str, Any]) -> LossGraph:
    try:
        parsed = parse_graph(name, inputs, graph, FUNCTIONS)
        trial_run(parsed)
    except LossGraphError as e:
        raise HTTPException(400, f"custom loss {name!r} refused: {e}") from None
    except Exception as e:  # anything else the graph provokes is still the graph's fault
        raise HTTPException(400, f"custom loss {name!r} refused: {type(e).__name__}: {e}") from None
    return parsed


@router.post("/create_custom_loss")
def create_custom_loss(body: s.CreateCustomLoss, caller: CallerDep) -> dict:
    state = caller.state
    caller.session(body.session_id)
    loss_id = tinker_paths.loss_id_for(body.session_id, body.custom_loss_seq_id)
    graph = parse(body.name, body.inputs, body.graph)
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
            request_id, JSON, {"loss_id": loss_id, "type": "create_custom_loss"}
        )
    return {"request_id": request_id}


def graph_of(caller: Caller, loss_id: str, session_id: str) -> LossGraph | None:
    """The caller's loss with this id, if made in this session (losses are session-private)."""
    row = caller.custom_loss(loss_id)
    if row.session_id != session_id:
        return None
    cache = caller.state.custom_losses
    if loss_id not in cache:  # e.g. after a restart
        cache[loss_id] = parse(row.name, row.inputs, row.graph)
    return cache[loss_id]
