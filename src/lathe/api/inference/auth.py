"""The caller of an inference request: its API key as `Authorization: Bearer` (OpenAI
clients) or `x-api-key` (Anthropic clients); the same users, keys and JWTs as the Tinker API."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header

from lathe.api.deps import Caller, State, authenticate


def inference_caller(
    state: State,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> Caller:
    token = x_api_key
    if authorization and authorization.lower().startswith("bearer "):
        token = authorization[len("bearer ") :].strip()
    return Caller(state, authenticate(state, token))


InferenceCaller = Annotated[Caller, Depends(inference_caller)]
