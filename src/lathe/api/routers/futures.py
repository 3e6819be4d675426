"""Long-polled futures: hold the request until the result is ready or the poll times out."""

from __future__ import annotations

import json

from fastapi import APIRouter, HTTPException, Response

from lathe.api import schemas as s
from lathe.api.deps import CallerDep

router = APIRouter(tags=["futures"])


@router.post("/retrieve_future")
async def retrieve_future(body: s.RetrieveFuture, caller: CallerDep) -> Response:
    state = caller.state
    future = await state.futures.wait(
        body.request_id, state.settings.long_poll_seconds, caller.user_id
    )
    if future is None:  # unknown, or another user's
        raise HTTPException(404, f"request {body.request_id!r} not found")
    if future.status == "pending":
        content = {"type": "try_again", "request_id": body.request_id, "queue_state": "active"}
        if body.request_id in state.engine.paused_for_capacity():
            content["queue_state"] = "paused_capacity"
            content["queue_state_reason"] = "waiting for KV cache memory on the server"
        return Response(json.dumps(content), media_type="application/json")
    if future.status == "failed" and future.category == "retry":
        # 410: the SDK raises RetryableException (and sends a sample again by itself)
        raise HTTPException(410, future.error or "the request was lost; retry it")
    if future.status == "failed":
        content = {"error": future.error or "failed", "category": future.category or "unknown"}
        return Response(json.dumps(content), media_type="application/json")
    return Response(future.payload or b"", media_type=future.media_type)
