"""Identity endpoints: short-lived JWTs (JWT mode) and the key description `tinker auth login`
reads."""

from __future__ import annotations

import time
from typing import Annotated

import jwt
from fastapi import APIRouter, Header, HTTPException

from lathe.api import responses as r
from lathe.api.deps import State, authenticate

router = APIRouter(tags=["auth"])

TOKEN_SECONDS = 3600


def user_urn(name: str) -> str:
    return f"lathe:user:{name}"


def raw_key_user(state, x_api_key: str | None):  # noqa: ANN001, ANN201
    """These endpoints take the API key itself (never a JWT)."""
    if x_api_key and x_api_key.startswith("eyJ"):
        raise HTTPException(401, "send the API key, not a token")
    return authenticate(state, x_api_key)


@router.post("/auth/token")
def auth_token(state: State, x_api_key: Annotated[str | None, Header()] = None) -> r.Token:
    if not state.settings.jwt:
        raise HTTPException(404, "JWT mode is off on this server (start it with --jwt)")
    user = raw_key_user(state, x_api_key)
    now = int(time.time())
    claims = {
        "sub": user_urn(user.name),  # the SDK's whoami shows this as user_urn
        "name": user.name,
        "org_id": "lathe",
        "iss": "lathe",
        "iat": now,
        "exp": now + TOKEN_SECONDS,
    }
    return r.Token(jwt=jwt.encode(claims, state.keys.secret, algorithm="HS256"))


@router.get("/auth/apikey/me")
def apikey_me(state: State, x_api_key: Annotated[str | None, Header()] = None) -> r.ApiKeyInfo:
    user = raw_key_user(state, x_api_key)
    found = state.keys.authenticate(x_api_key or "")
    key_id = found[1] if found else 0  # --dev: keys are not registered
    details = r.KeyDetails(
        org_details=r.OrgDetails(name="lathe"), user_details=r.UserDetails(email="")
    )
    return r.ApiKeyInfo(key_id=key_id, name=user.name, note="", details=details)
