"""A user's own API keys over REST (the console's keys view; `lathe keys` is the admin's)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from lathe.api import responses as r
from lathe.api.deps import CallerDep
from lathe.store.db import ApiKeyRow

router = APIRouter(tags=["api keys"])


def key_of(row: ApiKeyRow) -> r.ApiKey:
    return r.ApiKey(
        key_id=row.key_id,
        prefix=row.prefix,
        created_at=r.iso(row.created_at),
        revoked=row.revoked_at is not None,
    )


@router.get("/api_keys")
def list_api_keys(caller: CallerDep) -> r.ApiKeys:
    return r.ApiKeys(api_keys=[key_of(row) for row in caller.state.keys.keys_of(caller.user_id)])


@router.post("/api_keys")
def create_api_key(caller: CallerDep) -> r.NewApiKey:
    """A new key for the caller; the secret is in this answer only."""
    key, key_id = caller.state.keys.create_key(caller.user.name)
    row = next(k for k in caller.state.keys.keys_of(caller.user_id) if k.key_id == key_id)
    return r.NewApiKey(**key_of(row).model_dump(), key=key)


@router.delete("/api_keys/{key_id}")
def revoke_api_key(key_id: int, caller: CallerDep) -> r.Empty:
    if not caller.state.keys.revoke_own(caller.user_id, key_id):
        raise HTTPException(404, f"API key {key_id} not found (or already revoked)")
    return r.Empty()
