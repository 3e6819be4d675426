"""Which engine client a server gets, and the spec its engine is built from."""

from __future__ import annotations

from lathe.client.base import EngineClient
from lathe.protocol import messages as m
from lathe.settings import Settings
from lathe.store.catalog import read_info
from lathe.store.keys import server_secret


def engine_spec(settings: Settings) -> m.EngineSpec:
    """What the engine is built from: the serve options that are the engine's business."""
    return m.EngineSpec(
        models={name: read_info(name, path).path for name, path in settings.models.items()},
        dtype=settings.dtype,
        device=settings.device,
        threads=settings.threads,
        microbatch_tokens=settings.microbatch_tokens,
        checkpoint_activations_above=settings.checkpoint_activations_above,
        ranks=settings.ranks,
        deterministic=settings.deterministic,
        compile=settings.compile,
        max_resident_adapters=settings.max_resident_adapters,
        swap_dir=settings.swap_dir,
        kv_cache_tokens=settings.kv_cache_tokens,
    )


def new_engine_client(settings: Settings) -> EngineClient:
    """The engine in its own process (the default), on a thread of this one, or a shared
    engine service at a tcp:// address."""
    if settings.shared_engine:
        from lathe.client.remote import RemoteEngine

        secret = server_secret(settings.data_dir)
        return RemoteEngine(settings.engine, secret, list(settings.models))
    if settings.engine == "thread":
        from lathe.client.in_process import InProcessEngine  # loads torch here

        return InProcessEngine(engine_spec(settings))
    from lathe.client.own_process import OwnProcessEngine

    return OwnProcessEngine(engine_spec(settings))
