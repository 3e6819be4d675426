"""Client bootstrap and service-level endpoints."""

from __future__ import annotations

from fastapi import APIRouter

from lathe.api.deps import State

router = APIRouter(tags=["service"])


@router.post("/client/config")
def client_config() -> dict:
    # Defaults everywhere: plain API keys, chunked forward_backward posted in parallel.
    return {}


@router.post("/client/dynamic_config")
def client_dynamic_config() -> dict:
    return {}


@router.get("/get_server_capabilities")
def get_server_capabilities(state: State) -> dict:
    return {
        "supported_models": [
            {
                "model_name": info.name,
                "max_context_length": info.max_context,
                "trainable": True,
                "sampleable": True,
            }
            for info in state.catalog.values()
        ]
    }


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.post("/telemetry")
def telemetry() -> dict:
    # Accepted and dropped: the server keeps no client telemetry.
    return {"status": "accepted"}
