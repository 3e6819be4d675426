"""Dependencies declared once and shared by the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request

from lathe.api.state import AppState
from lathe.store.db import SessionRow, TrainingRunRow

KEY_PREFIX = "tml-"


def get_state(request: Request) -> AppState:
    return request.app.state.lathe


State = Annotated[AppState, Depends(get_state)]


def require_api_key(x_api_key: Annotated[str | None, Header()] = None) -> str:
    """Every API call carries `X-API-Key: tml-...` (per-user keys come with the users module)."""
    if not x_api_key:
        raise HTTPException(401, "missing X-API-Key header")
    if not x_api_key.startswith(KEY_PREFIX) or len(x_api_key) <= len(KEY_PREFIX):
        raise HTTPException(401, f"invalid API key: keys start with {KEY_PREFIX!r}")
    return x_api_key


def session_or_404(state: AppState, session_id: str) -> SessionRow:
    row = state.store.get(SessionRow, session_id)
    if row is None:
        raise HTTPException(404, f"session {session_id!r} not found")
    return row


def training_run_or_404(state: AppState, model_id: str) -> TrainingRunRow:
    row = state.store.get(TrainingRunRow, model_id)
    if row is None:
        raise HTTPException(404, f"model {model_id!r} not found")
    return row
