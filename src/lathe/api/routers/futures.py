"""Long-polled futures: hold the request until the result is ready or the poll times out."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter, HTTPException, Response

from lathe.api import responses as r
from lathe.api import schemas as s
from lathe.api.deps import CallerDep
from lathe.protocol import messages as m
from lathe.store import completions
from lathe.store.db import FutureRow

OTHER_REPLICAS_S = 0.5  # how often a long poll re-reads the completions other replicas wrote

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


@router.post("/cancel_future")
def cancel_future(body: s.CancelFuture, caller: CallerDep) -> r.Empty:
    """Stop a sample request the client abandoned (SDK 0.38, when /client/dynamic_config says
    sample_cancel_enabled): queued, it leaves the queue; running, it frees its KV cache. Its
    future fails with "cancelled"; a finished one stays as it is."""
    state = caller.state
    row = state.store.get(FutureRow, body.request_id)
    if row is None or row.owner_id != caller.user_id:
        raise HTTPException(404, f"request {body.request_id!r} not found")
    if row.kind != "sample":
        raise HTTPException(400, f"only sampling requests can be cancelled, not {row.kind}")
    if row.status == "pending":
        cancel = m.CancelRequest([body.request_id])
        state.engine.submit(m.Work("", cancel, tenant=str(caller.user_id)))
    return r.Empty()


@router.post("/retrieve_futures")
async def retrieve_futures(body: s.RetrieveFutures, caller: CallerDep) -> r.FutureCompletions:
    """SDK 0.38's session-wide poller: the sampling session's completions after `prev_cursor`
    (held until there is one, or the long poll ends); those at or before it are forgotten."""
    state, target = caller.state, body.target
    sampler_id, clone = target.sampling_session_id, target.cloned_sampler_id
    await asyncio.to_thread(caller.sampler, sampler_id)  # 404 unless the caller's
    await asyncio.to_thread(
        completions.acknowledge, state.store, sampler_id, clone, body.prev_cursor
    )
    wait = state.settings.long_poll_seconds if body.timeout is None else body.timeout
    deadline = time.monotonic() + wait
    while True:
        rows = await asyncio.to_thread(
            completions.completions_after, state.store, sampler_id, clone, body.prev_cursor
        )
        left = deadline - time.monotonic()
        if rows or left <= 0:
            break
        await state.futures.sample_finished(min(left, OTHER_REPLICAS_S))
    return r.FutureCompletions(
        completions=[
            r.FutureCompletion(
                state="finished" if row.state == "finished" else "failed",
                request_id=row.request_id,
                response_payload_uncompressed_size=row.payload_size,
            )
            for row in rows
        ],
        cursor=rows[-1].seq if rows else body.prev_cursor,
    )
