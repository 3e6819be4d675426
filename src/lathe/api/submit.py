"""Turning a validated request into a future and a unit of engine work."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import HTTPException

from lathe.api.futures import Finisher
from lathe.api.state import AppState
from lathe.engine import messages as m

JSON = "application/json"


def json_result(build: Callable[[Any], dict[str, Any]]) -> Finisher:
    """A finisher that answers with the JSON object `build(result)` returns."""
    return lambda result: (JSON, json.dumps(build(result)).encode())


def ordered_key(model_id: str, seq_id: int) -> str:
    """Natural key of a training model's ordered request: a retried POST maps to it."""
    return f"train:{model_id}:{seq_id}"


def submit(
    state: AppState, kind: str, natural_key: str | None, request: m.Request, finisher: Finisher
) -> tuple[str, bool]:
    """Create (or find, for a retried POST) the future and enqueue the work once.

    Returns (request_id, created).
    """
    request_id, created = state.futures.create(kind, natural_key, finisher)
    if created:
        state.engine.submit(m.Work(request_id, request))
    return request_id, created


@contextmanager
def refusal_uses_seq_id(state: AppState, kind: str, model_id: str, seq_id: int) -> Iterator[None]:
    """A training request refused with a 4xx inside this block still uses up its seq id.

    The client has already numbered its next requests after this one; without the skip they
    would wait forever for a seq id that never comes.
    """
    try:
        yield
    except HTTPException as e:
        if 400 <= e.status_code < 500:
            request_id, created = state.futures.create(kind, ordered_key(model_id, seq_id), None)
            if created:
                state.futures.fail_now(request_id, str(e.detail))
                state.engine.submit(m.Work(request_id, m.SkipRequest(model_id, seq_id)))
        raise
