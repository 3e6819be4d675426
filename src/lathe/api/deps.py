"""Dependencies declared once and shared by the routers: who is calling, and what they may see.

Every route gets a `Caller`. Resources (sessions, training runs, samplers, checkpoints,
futures, custom losses) are looked up only through it, and it answers 404 for anything the
caller does not own, exactly as for something that does not exist, so nobody learns what
other users have. Published checkpoints are the one exception: anyone may read and load
them, only their owner may change or delete them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import jwt
from fastapi import Depends, Header, HTTPException, Request

from lathe.api.state import AppState
from lathe.store import checkpoint_files, tinker_paths
from lathe.store.db import (
    CheckpointRow,
    CustomLossRow,
    SamplingSessionRow,
    SessionRow,
    TrainingRunRow,
)
from lathe.store.keys import KEY_PREFIX, LOCAL_USER, User

JWT_PREFIX = "eyJ"


def get_state(request: Request) -> AppState:
    return request.app.state.lathe


State = Annotated[AppState, Depends(get_state)]


def authenticate(state: AppState, credential: str | None) -> User:
    """The user an X-API-Key header stands for, or a 401 with a JSON detail."""
    if not credential:
        raise HTTPException(401, "missing X-API-Key header")
    if credential.startswith(JWT_PREFIX) and state.settings.jwt:
        return user_from_jwt(state, credential)
    if not credential.startswith(KEY_PREFIX) or len(credential) <= len(KEY_PREFIX):
        raise HTTPException(401, f"invalid API key: keys start with {KEY_PREFIX!r}")
    if state.settings.dev:  # local mode: any tml- key is the one local user
        user = state.keys.user(LOCAL_USER, create=True)
        assert user is not None
        return user
    found = state.keys.authenticate(credential)
    if found is None:
        raise HTTPException(401, "unknown or revoked API key")
    return found[0]


def user_from_jwt(state: AppState, token: str) -> User:
    try:
        claims = jwt.decode(
            token, state.keys.secret, algorithms=["HS256"], options={"require": ["exp", "sub"]}
        )
    except jwt.PyJWTError as e:
        # The SDK exchanges a fresh token and replays the request on this header.
        raise HTTPException(
            401, f"invalid token: {e}", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
        ) from None
    name = str(claims.get("name", ""))
    user = state.keys.user(name)
    if user is None or claims["sub"] != f"lathe:user:{name}":
        raise HTTPException(
            401,
            "invalid token: unknown user",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return user


@dataclass
class Caller:
    """The authenticated user of a request, and the only way routers reach resources."""

    state: AppState
    user: User

    @property
    def user_id(self) -> int:
        return self.user.user_id

    def _owned(self, row, what: str):  # noqa: ANN001, ANN202 - any row with owner_id
        if row is None or row.owner_id != self.user_id:
            raise HTTPException(404, f"{what} not found")
        return row

    def session(self, session_id: str) -> SessionRow:
        row = self.state.store.get(SessionRow, session_id)
        return self._owned(row, f"session {session_id!r}")

    def training_run(self, model_id: str) -> TrainingRunRow:
        row = self.state.store.get(TrainingRunRow, model_id)
        return self._owned(row, f"model {model_id!r}")

    def active_training_run(self, model_id: str) -> TrainingRunRow:
        """A run whose session is still going: only those can take training requests."""
        run = self.training_run(model_id)
        session = self.state.store.get(SessionRow, run.session_id)
        if session is not None and session.finished_at is not None:
            raise HTTPException(
                400,
                f"the session of {model_id} has ended (closed, or no heartbeat for "
                f"{self.state.settings.session_timeout_seconds:.0f} s); create a new training "
                "client, from a checkpoint to continue",
            )
        return run

    def sampler(self, sampler_id: str) -> SamplingSessionRow:
        row = self.state.store.get(SamplingSessionRow, sampler_id)
        return self._owned(row, f"sampling session {sampler_id!r}")

    def custom_loss(self, loss_id: str) -> CustomLossRow:
        row = self.state.store.get(CustomLossRow, loss_id)
        return self._owned(row, f"custom loss {loss_id!r}")

    def checkpoint(self, path: str, *, write: bool = False) -> CheckpointRow:
        """A checkpoint the caller owns, or (to read or load) one its owner published."""
        tp = tinker_paths.parse(path)
        row = self.state.store.find_checkpoint(tp.model_id, tp.kind, tp.name)
        if row is None or not (row.owner_id == self.user_id or (row.public and not write)):
            raise HTTPException(404, f"checkpoint {path} not found")
        if not checkpoint_files.is_complete(row.directory_path):
            raise HTTPException(404, f"checkpoint {path} is listed but its files are missing")
        return row


def get_caller(state: State, x_api_key: Annotated[str | None, Header()] = None) -> Caller:
    return Caller(state, authenticate(state, x_api_key))


CallerDep = Annotated[Caller, Depends(get_caller)]
