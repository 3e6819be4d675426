"""Client bootstrap and service-level endpoints."""

from __future__ import annotations

from fastapi import APIRouter

from lathe.api import responses as r
from lathe.api.deps import CallerDep, State

router = APIRouter(tags=["service"])


# What the SDK is told at start-up (tinker-wire §6.1.1): these features of the server, then what
# the settings add (Settings.sdk_client_config). The rest stays at the SDK's defaults: plain API
# keys, forward_backward chunks posted in parallel.
CLIENT_CONFIG = {
    "proto_compress_fwdbwd": True,  # forward_backward bodies arrive zstd-compressed
    "custom_loss_server_side": True,  # create_custom_loss uploads the traced loss
    "sample_use_retrieve_futures": True,  # one poller per sampling session (/retrieve_futures)
    "sample_join_sampling_session": True,  # SamplingClient copies ask for their clone number
}


@router.post("/client/config")
def client_config(state: State) -> r.ClientConfig:
    return r.ClientConfig(**{**CLIENT_CONFIG, **state.settings.sdk_client_config})


@router.post("/client/dynamic_config")
def client_dynamic_config() -> r.DynamicConfig:
    """SDK 0.38 refreshes these while it runs: abandoned samples are cancelled
    (/cancel_future)."""
    return r.DynamicConfig(
        refresh_interval_sec=300, sample_cancel_enabled=True, sample_cancel_max_batch_size=64
    )


@router.get("/get_server_capabilities")
def get_server_capabilities(state: State) -> r.ServerCapabilities:
    models = [
        r.SupportedModel(
            model_name=info.name,
            max_context_length=info.max_context,
            trainable=True,
            sampleable=True,
        )
        for info in state.catalog.values()
    ]
    return r.ServerCapabilities(supported_models=models)


@router.get("/healthz")
def healthz() -> r.Healthy:
    return r.Healthy()


@router.post("/telemetry")
def telemetry() -> r.TelemetryAccepted:
    # Accepted and dropped: the server keeps no client telemetry.
    return r.TelemetryAccepted()


@router.get("/status")
def status(caller: CallerDep) -> r.ServerStatus:
    """What the engine holds and does right now (models, queues, throughput, memory)."""
    return r.ServerStatus(you=caller.user.name, **caller.state.engine.status())
