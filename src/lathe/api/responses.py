"""JSON responses of the Tinker API, shaped as the SDK's response models (tinker-wire §6).

Two kinds: what a route answers at once (declared as its return type, so FastAPI checks and
documents it), and the JSON results of futures, which the engine's answer fills in later and
`retrieve_future` hands back verbatim. The SDK validates both: field names, and whether a key
is null or absent, are part of the contract. Routes answering protobuf or a raw Response
(forward_backward's and sample's results, retrieve_future, downloads) have no model here.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from lathe.api.futures import Finisher
from lathe.api.submit import json_result
from lathe.store.catalog import BaseModelInfo
from lathe.store.db import CheckpointRow, TrainingRunRow, as_utc
from lathe.store.tinker_paths import KINDS


class Reply(BaseModel):
    # Our own answers: an unknown field is a bug here, not a newer client.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Open(BaseModel):
    """A reply whose extra keys pass through (settings and the engine add their own)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())


def iso(t: dt.datetime) -> str:
    return as_utc(t).isoformat().replace("+00:00", "Z")


def str_metadata(metadata: dict[str, Any] | None) -> dict[str, str]:
    """user_metadata as the SDK reads it back: dict[str, str]."""
    return {k: str(v) for k, v in (metadata or {}).items()}


# -- service -------------------------------------------------------------------------------


class Empty(Reply):
    """`{}`: the SDK only looks at the status of these (2xx)."""


class FutureCompletion(Reply):
    """One finished (or failed) request of /retrieve_futures; the SDK then fetches it with
    retrieve_future."""

    state: Literal["finished", "failed"]
    request_id: str
    response_payload_uncompressed_size: int | None = None


class FutureCompletions(Reply):
    completions: list[FutureCompletion]
    cursor: int  # pass back as prev_cursor


class ClientCounter(Reply):
    """join_sampling_session: this copy's clone number (its seq ids start at n * 1e9)."""

    client_counter: int


class DynamicConfig(Reply):
    """ClientDynamicConfigResponse (SDK 0.38)."""

    refresh_interval_sec: int
    sample_cancel_enabled: bool
    sample_cancel_max_batch_size: int


class ClientConfig(Open):
    """ClientConfigResponse: every field optional in the SDK; settings may add any of them."""

    proto_compress_fwdbwd: bool
    custom_loss_server_side: bool
    sample_use_retrieve_futures: bool
    sample_join_sampling_session: bool


class SupportedModel(Reply):
    model_name: str
    max_context_length: int
    trainable: bool
    sampleable: bool


class ServerCapabilities(Reply):
    supported_models: list[SupportedModel]


class Healthy(Reply):
    status: Literal["ok"] = "ok"


class TelemetryAccepted(Reply):
    status: Literal["accepted"] = "accepted"  # the SDK checks for exactly this


class ServerStatus(Open):
    """GET /status: the caller's name, then whatever the engine client reports."""

    you: str


class Token(Reply):
    jwt: str


class OrgDetails(Reply):
    name: str


class UserDetails(Reply):
    email: str


class KeyDetails(Reply):
    org_details: OrgDetails
    user_details: UserDetails


class ApiKey(Reply):
    key_id: int
    prefix: str  # the key's first characters, to tell keys apart
    created_at: str
    revoked: bool


class ApiKeys(Reply):
    api_keys: list[ApiKey]


class NewApiKey(ApiKey):
    key: str  # the secret itself: shown this once, stored only as a hash


class ApiKeyInfo(Reply):
    key_id: int
    name: str
    note: str
    details: KeyDetails


# -- sessions ------------------------------------------------------------------------------


class SessionCreated(Reply):
    session_id: str
    type: Literal["create_session"] = "create_session"


class HeartbeatAck(Reply):
    type: Literal["session_heartbeat"] = "session_heartbeat"


class SessionList(Reply):
    sessions: list[str]


class SessionSummary(Reply):
    session_id: str
    created_at: str
    owner: str
    project_id: str
    status: dict[str, Any] | None  # {"type": "active"} | {"type": "client_finished", ...} | ...
    checkpoints_count: int
    display_name: str | None = None
    user_metadata: dict[str, str] | None = None
    checkpoint_storage_bytes: int | None = None


class SessionSearchPage(Reply):
    sessions: list[SessionSummary]
    next_cursor: dict[str, str] | None = None  # {"last_created_at", "last_session_id"}


class CheckpointStorageItem(Reply):
    project_id: str | None
    user_name: str
    checkpoint_count: int
    size_bytes: int
    size_gigabytes: float


class CheckpointStorage(Reply):
    """GET /billing/usage/checkpoints/current: no prices on a self-hosted server."""

    data: list[CheckpointStorageItem]


class BillingEvent(Reply):
    """One hourly bucket of one kind of usage (the SDK's BillingUsageEvent)."""

    bucket_start: str
    bucket_end: str
    base_model: str | None
    user_name: str
    session_id: str | None
    project_id: str | None
    event_info: dict[str, Any]  # {"type": "training", "token_count": n} | ...


class BillingUsage(Reply):
    data: list[BillingEvent]
    sessions: dict[str, dict[str, Any]]  # session id -> {"user_metadata": {...}}


class AuditEntry(Reply):
    timestamp: str
    event: str  # <resource>_<action>, e.g. checkpoint_publish
    event_details: dict[str, Any]
    model_id: str | None = None
    tinker_path: str | None = None


class AuditLog(Reply):
    entries: list[AuditEntry]


class TraceExport(Reply):
    status: Literal["ready"]
    url: str  # signed, no API key needed


class SessionInfo(Reply):
    training_run_ids: list[str]
    sampler_ids: list[str]
    user_metadata: dict[str, str]
    display_name: str | None


# -- requests answered by a future ---------------------------------------------------------


class Queued(Reply):
    """The sync answer of a request that runs later: poll retrieve_future with request_id."""

    request_id: str


class QueuedForModel(Reply):
    request_id: str
    model_id: str


class QueuedSample(Reply):
    request_id: str
    sample_sequence_ids: list[str]  # one per sample (0.38 requires them)


# -- training ------------------------------------------------------------------------------


class ModelData(Reply):
    arch: str | None
    model_name: str
    # A local folder: AutoTokenizer.from_pretrained loads it on this machine.
    tokenizer_id: str | None


class ModelInfo(Reply):
    type: Literal["get_info"] = "get_info"
    model_id: str
    model_data: ModelData
    is_lora: bool = True
    lora_rank: int
    model_name: str
    # Not in the SDK's model (it ignores them); which modules carry adapters.
    train_attn: bool
    train_mlp: bool
    train_unembed: bool

    @classmethod
    def of(cls, run: TrainingRunRow, info: BaseModelInfo | None) -> ModelInfo:
        return cls(
            model_id=run.model_id,
            model_data=ModelData(
                arch=info.arch if info else None,
                model_name=run.base_model,
                tokenizer_id=str(info.path) if info else None,
            ),
            lora_rank=run.lora_rank,
            model_name=run.base_model,
            train_attn=run.train_attn,
            train_mlp=run.train_mlp,
            train_unembed=run.train_unembed,
        )


class WeightsInfo(Reply):
    base_model: str
    is_lora: bool = True
    lora_rank: int
    train_attn: bool
    train_mlp: bool
    train_unembed: bool

    @classmethod
    def of(cls, metadata: dict[str, Any]) -> WeightsInfo:
        """From a checkpoint's metadata.json."""
        lora = metadata["lora"]
        return cls(
            base_model=metadata["base_model"],
            lora_rank=lora["rank"],
            train_attn=lora["train_attn"],
            train_mlp=lora["train_mlp"],
            train_unembed=lora["train_unembed"],
        )


# -- sampling ------------------------------------------------------------------------------


class SamplingSessionCreated(Reply):
    sampling_session_id: str
    type: Literal["create_sampling_session"] = "create_sampling_session"


class SamplerInfo(Reply):
    sampler_id: str
    base_model: str
    model_path: str | None


# -- checkpoints and training runs ---------------------------------------------------------


class Checkpoint(Reply):
    checkpoint_id: str  # "<kind>/<name>"
    checkpoint_type: str  # training | sampler | external
    time: str
    tinker_path: str
    size_bytes: int
    public: bool
    user_metadata: dict[str, str]
    expires_at: str | None

    @classmethod
    def of(cls, row: CheckpointRow) -> Checkpoint:
        return cls(
            checkpoint_id=f"{row.kind}/{row.name}",
            checkpoint_type=KINDS[row.kind],
            time=iso(row.created_at),
            tinker_path=row.tinker_path,
            size_bytes=row.size_bytes,
            public=row.public,
            user_metadata=str_metadata(row.user_metadata),
            expires_at=iso(row.expires_at) if row.expires_at else None,
        )


class Cursor(Reply):
    offset: int
    limit: int
    total_count: int


class RunCheckpoints(Reply):
    checkpoints: list[Checkpoint]  # (no cursor: a run's list comes whole)


class UserCheckpoints(Reply):
    checkpoints: list[Checkpoint]
    cursor: Cursor


class DownloadUrls(Reply):
    urls: dict[str, str]  # file name -> signed URL
    expires: str


class ArchiveUrl(Reply):
    url: str
    expires: str


class CopiedWeights(Reply):
    tinker_path: str


class TrainingRun(Reply):
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool = True
    corrupted: bool = False
    lora_rank: int
    last_request_time: str
    last_checkpoint: Checkpoint | None
    last_sampler_checkpoint: Checkpoint | None
    user_metadata: dict[str, str]
    # beyond the SDK's fields (its responses ignore extras): for the console
    created_time: str
    optim_steps: int  # optim_steps that succeeded
    active: bool  # its session still goes on (it takes training requests)

    @classmethod
    def of(
        cls,
        run: TrainingRunRow,
        owner: str,
        checkpoints: list[CheckpointRow],
        optim_steps: int,
        active: bool,
    ) -> TrainingRun:
        last: dict[str, Checkpoint | None] = {"weights": None, "sampler_weights": None}
        for c in checkpoints:  # oldest first: the last one of each kind wins
            if c.kind in last:
                last[c.kind] = Checkpoint.of(c)
        return cls(
            training_run_id=run.model_id,
            base_model=run.base_model,
            model_owner=owner,
            lora_rank=run.lora_rank,
            last_request_time=iso(run.last_request_at),
            last_checkpoint=last["weights"],
            last_sampler_checkpoint=last["sampler_weights"],
            user_metadata=str_metadata(run.user_metadata),
            created_time=iso(run.created_at),
            optim_steps=optim_steps,
            active=active,
        )


class TrainingRuns(Reply):
    training_runs: list[TrainingRun]
    cursor: Cursor


class StepMetrics(Reply):
    seq_id: int
    kind: str  # forward_backward | forward | optim_step
    at: str
    metrics: dict[str, float | None]  # null: a non-finite value


class TrainingRunMetrics(Reply):
    """One page of a run's step metrics, in seq order; ask again with after_seq=next_after_seq."""

    metrics: list[StepMetrics]
    next_after_seq: int


# -- JSON results of futures ---------------------------------------------------------------


def result(build: Callable[[Any], BaseModel]) -> Finisher:
    """A finisher answering with `build(engine_result)` as JSON; None fields are left out
    (the SDK's result models mark them optional, not nullable)."""
    return json_result(lambda r: build(r).model_dump(exclude_none=True))


class ModelCreated(Reply):
    model_id: str
    type: Literal["create_model"] = "create_model"


class OptimStepDone(Reply):
    type: Literal["optim_step"] = "optim_step"
    metrics: dict[str, float]


class CheckpointSaved(Reply):
    path: str  # tinker://<model_id>/<kind>/<name>
    type: str  # save_weights | save_weights_for_sampler | save_weights_external
    size_bytes: int | None = None  # exports only


class SamplerSaved(Reply):
    sampling_session_id: str
    type: Literal["save_weights_for_sampler"] = "save_weights_for_sampler"


class WeightsLoaded(Reply):
    path: str
    type: Literal["load_weights"] = "load_weights"


class CustomLossCreated(Reply):
    loss_id: str
    type: Literal["create_custom_loss"] = "create_custom_loss"
