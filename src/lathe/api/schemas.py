"""JSON request bodies of the Tinker API (SDK 0.25-0.38), kept apart from engine messages.

Unknown keys are ignored (newer SDKs add fields); missing optional keys take the SDK's
defaults. Responses are typed apart, in api/responses.py.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lathe.protocol.messages import AdamParams


class Body(BaseModel):
    # Unknown keys are ignored (newer SDKs add fields); NaN and infinity are never valid numbers.
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), allow_inf_nan=False)


class CreateSession(Body):
    tags: list[str] = []
    user_metadata: dict[str, Any] | None = None
    sdk_version: str | None = None
    project_id: str | None = None
    display_name: str | None = None


class SessionHeartbeat(Body):
    session_id: str


class LoraConfigIn(Body):
    rank: int = 32
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class CreateModel(Body):
    session_id: str
    model_seq_id: int = Field(ge=0)
    base_model: str
    user_metadata: dict[str, Any] | None = None
    lora_config: LoraConfigIn = LoraConfigIn()
    optimizer_config: dict[str, Any] | None = None


class ModelRef(Body):
    model_id: str


_ADAM = AdamParams()  # the defaults are the engine message's (Tinker's), written there once


class AdamParamsIn(Body):
    learning_rate: float = Field(_ADAM.learning_rate, ge=0)
    beta1: float = Field(_ADAM.beta1, ge=0, lt=1)
    beta2: float = Field(_ADAM.beta2, ge=0, lt=1)
    eps: float = Field(_ADAM.eps, ge=0)
    weight_decay: float = Field(_ADAM.weight_decay, ge=0)
    grad_clip_norm: float = Field(_ADAM.grad_clip_norm, ge=0)


class OptimStep(Body):
    model_id: str
    seq_id: int = Field(ge=1)
    adam_params: AdamParamsIn | None = None
    optimizer_params: dict[str, Any] | None = None  # 0.38 non-Adam optimizers
    optim_params: dict[str, Any] | None = None


class SaveWeights(Body):
    model_id: str
    seq_id: int = Field(ge=1)
    path: str | None = None  # the checkpoint name
    ttl_seconds: int | None = None
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None


class SaveWeightsExternal(Body):
    model_id: str
    seq_id: int = Field(ge=1)
    path: str  # the export's name
    ttl_seconds: int | None = None
    age_encryption_recipients: list[str] | None = None


class SaveWeightsForSampler(Body):
    model_id: str
    seq_id: int = Field(ge=1)
    path: str | None = None  # named mode
    sampling_session_seq_id: int | None = Field(None, ge=0)  # unnamed mode
    kind: Literal["snapshot", "inflight"] = "snapshot"
    ttl_seconds: int | None = None
    user_metadata: dict[str, str] | None = None


class LoadWeights(Body):
    path: str
    optimizer: bool = False
    model_id: str | None = None  # legacy mode: load into an existing model ...
    seq_id: int | None = Field(None, ge=1)  # ... at this position of its order
    session_id: str | None = None  # create-via-load: this request creates the model
    model_seq_id: int | None = Field(None, ge=0)
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None


class WeightsInfo(Body):
    tinker_path: str


class CreateSamplingSession(Body):
    session_id: str
    sampling_session_seq_id: int = Field(ge=0)
    base_model: str | None = None
    model_path: str | None = None


class Chunk(Body):
    type: str = "encoded_text"
    tokens: list[int] | None = None


class ModelInputIn(Body):
    chunks: list[Chunk]


class SamplingParamsIn(Body):
    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0


class Sample(Body):
    sampling_session_id: str | None = None
    seq_id: int | None = Field(None, ge=0)
    num_samples: int = 1
    prompt: ModelInputIn
    sampling_params: SamplingParamsIn = SamplingParamsIn()
    base_model: str | None = None
    model_path: str | None = None
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    prompt_alt_tokens_k: int = 0
    prompt_logprobs_last_n: int | None = None
    target_prompt_logprobs: dict[str, Any] | None = None
    record_stability_info: bool = False  # only for stable_reinforce, which is not served


class CreateCustomLoss(Body):
    session_id: str
    custom_loss_seq_id: int = Field(ge=0)
    name: str = Field(max_length=256)
    inputs: list[dict[str, Any]]  # [{"name", "rank"}], logprobs first
    graph: dict[str, Any]  # {"format": 1, "nodes": [...]}: checked by custom_loss_graph


class RetrieveFuture(Body):
    request_id: str
    allow_metadata_only: bool = False


class FuturesTarget(Body):
    type: Literal["sampling_session"] = "sampling_session"
    sampling_session_id: str
    cloned_sampler_id: int = Field(0, ge=0)  # the SamplingClient copy (seq_id // 1e9)


class RetrieveFutures(Body):
    """SDK 0.38's session-wide poller (client config sample_use_retrieve_futures)."""

    target: FuturesTarget
    prev_cursor: int = Field(0, ge=0)  # completions at or before it are acknowledged
    timeout: float | None = Field(None, ge=0)  # None: the server's long poll; 0: answer now
    retrieved_request_ids: list[str] = []  # payloads fetched (kept here: futures stay readable)


class JoinSamplingSession(Body):
    sampling_session_id: str


class SearchOwner(Body):
    type: Literal["own", "accessible", "user"] = "own"
    owner_urns: list[str] = Field([], max_length=10)  # with "user": user names


class StatusQuery(Body):
    type: Literal["active", "cancelled", "failed", "client_finished"]
    reasons: list[Literal["success", "errored", "interrupted"]] | None = None  # client_finished


class SearchCursor(Body):
    last_created_at: dt.datetime
    last_session_id: str


class SessionSearch(Body):
    """SDK 0.38's RestClient.search_sessions (experimental)."""

    session_id: str | None = None
    project_ids: list[str] | None = None
    user_metadata: dict[str, str] = {}
    display_name: str | None = Field(None, min_length=1)
    owner: SearchOwner = SearchOwner()
    statuses: list[StatusQuery] | None = Field(None, min_length=1)
    limit: int = Field(50, ge=1, le=200)
    cursor: SearchCursor | None = None


class CancelFuture(Body):
    request_id: str


class CheckpointTtl(Body):
    ttl_seconds: int | None = None  # None removes the expiry


class SessionProject(Body):
    project_id: str


class CopyWeights(Body):
    source_path: str
    destination_project_id: str | None = None
    session_id: str | None = None
    model_seq_id: int | None = None
    ttl_seconds: int | None = None


class FinishSession(Body):
    reason: dict[str, Any] | None = None
    detail: str | None = None
