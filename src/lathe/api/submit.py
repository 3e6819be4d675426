"""Turning a validated request into a future and a unit of engine work."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import HTTPException
from pydantic import BaseModel

from lathe.api.deps import Caller
from lathe.api.futures import Finisher, ReusedKey
from lathe.api.state import AppState
from lathe.api.step_metrics import Step
from lathe.api.usage_accounting import Usage
from lathe.protocol import messages as m
from lathe.store.tinker_paths import PathError

JSON = "application/json"


def json_result(build: Callable[[Any], dict[str, Any]]) -> Finisher:
    """A finisher that answers with the JSON object `build(result)` returns."""
    return lambda result: (JSON, json.dumps(build(result)).encode())


def ordered_key(model_id: str, seq_id: int) -> str:
    """Natural key of a training model's ordered request: a retried POST maps to it."""
    return f"train:{model_id}:{seq_id}"


def creation_key(model_id: str) -> str:
    """Natural key of the request that creates a training model (create_model, load_weights)."""
    return f"model:{model_id}"


def is_retry(state: AppState, natural_key: str | None) -> bool:
    """A POST whose natural key already has a future: the client is retrying it."""
    return natural_key is not None and state.store.future_by_key(natural_key) is not None


def fingerprint(content: bytes | str | BaseModel) -> str:
    """What makes two POSTs the same request: a hash of the parsed content."""
    if isinstance(content, BaseModel):
        content = content.model_dump_json()
    if isinstance(content, str):
        content = content.encode()
    return hashlib.sha256(content).hexdigest()


def submit(
    caller: Caller,
    kind: str,
    natural_key: str | None,
    request: m.Request,
    finisher: Finisher,
    content_hash: str = "",
    usage: Usage | None = None,
    step: Step | None = None,
) -> tuple[str, bool]:
    """Create (or find, for a retried POST) the future and enqueue the work once.

    A different request reusing the natural key (the same seq id, say) is refused with a 400:
    not a 409, which the SDK would retry for minutes. A user with too many unfinished
    requests gets a 429 with retry-after, which the SDK backs off from. Returns
    (request_id, created).
    """
    state = caller.state
    limit = state.settings.limits.max_queued_requests
    if not is_retry(state, natural_key) and state.futures.pending_for(caller.user_id) >= limit:
        raise HTTPException(
            429,
            f"too many unfinished requests (limit max_queued_requests={limit})",
            headers={"retry-after": "1"},
        )
    try:
        request_id, created = state.futures.create(
            kind, natural_key, finisher, caller.user_id, content_hash, usage, step
        )
    except ReusedKey as e:
        raise HTTPException(
            400, f"{describe(natural_key)} was already used by a different {e.args[0]} request"
        ) from None
    if created:
        state.engine.submit(m.Work(request_id, request, tenant=str(caller.user_id)))
        if natural_key is not None and natural_key.startswith("train:"):
            # the training run's last_request_time (REST listings show it)
            state.store.touch_run(natural_key.split(":", 1)[1].rsplit(":", 1)[0])
    return request_id, created


def describe(natural_key: str | None) -> str:
    kind, _, rest = (natural_key or "").partition(":")
    if kind == "train":
        model_id, _, seq = rest.rpartition(":")
        return f"seq_id {seq} of model {model_id}"
    return f"{kind} id {rest}"


@contextmanager
def refusal_uses_seq_id(caller: Caller, kind: str, model_id: str, seq_id: int) -> Iterator[None]:
    """A training request refused with a 4xx inside this block still uses up its seq id.

    The client has already numbered its next requests after this one; without the skip they
    would wait forever for a seq id that never comes.
    """
    try:
        try:
            yield
        except PathError as e:
            raise HTTPException(400, str(e)) from None
    except HTTPException as e:
        if 400 <= e.status_code < 500 and e.status_code != 429:
            futures = caller.state.futures
            try:
                request_id, created = futures.create(
                    kind, ordered_key(model_id, seq_id), None, caller.user_id
                )
            except ReusedKey:  # the seq id already belongs to another request
                raise e from None
            if created:
                futures.fail_now(request_id, str(e.detail))
                caller.state.engine.submit(m.Work(request_id, m.SkipRequest(model_id, seq_id)))
        raise
