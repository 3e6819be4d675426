"""Everything a request handler may reach, built once per server (see api/app.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lathe.api.futures import FutureRegistry
from lathe.api.inference.sampler_cache import SamplerCache
from lathe.client.base import EngineClient
from lathe.protocol.loss_graph import LossGraph
from lathe.settings import Settings
from lathe.store.catalog import BaseModelInfo
from lathe.store.db import Store
from lathe.store.keys import KeyStore


@dataclass
class AppState:
    settings: Settings
    store: Store
    catalog: dict[str, BaseModelInfo]  # served base models by client-facing name
    futures: FutureRegistry
    engine: EngineClient  # the engine, wherever it runs
    keys: KeyStore  # users and API keys
    custom_losses: dict[str, LossGraph] = field(default_factory=dict)  # parsed, by loss id
    inference_samplers: SamplerCache = field(
        default_factory=SamplerCache
    )  # for /oai and /anthropic
