"""Every message that crosses the boundary between the API and the engine.

The API validates a request, turns it into one of the `*Request` messages below, wraps it in a
`Work` envelope with its future's id and submits it; the engine answers with a `Done` carrying a
`*Result` or an error. Nothing here holds torch state: messages are plain data (lists, numpy
arrays) so that the engine can later live in another process behind the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lathe.protocol.loss_graph import LossGraph

# --- training -------------------------------------------------------------------------------

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
UNEMBED_TARGET = "lm_head"
LORA_ALPHA = 32.0  # as Tinker: the delta is scaled by alpha / rank


@dataclass(frozen=True)
class LoraConfig:
    """Shape of one adapter; written into every checkpoint."""

    rank: int  # inner dimension of A (rank x in) and B (out x rank)
    train_attn: bool = True  # adapters on q/k/v/o projections
    train_mlp: bool = True  # adapters on gate/up/down projections
    train_unembed: bool = True  # an adapter on the unembedding (lm_head)
    alpha: float = LORA_ALPHA  # scaling numerator

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.rank}")
        if not (self.train_attn or self.train_mlp or self.train_unembed):
            raise ValueError("at least one of train_attn, train_mlp, train_unembed must be true")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def targets(self, module_name: str) -> bool:
        leaf = module_name.rsplit(".", 1)[-1]
        return (
            (self.train_attn and leaf in ATTN_TARGETS)
            or (self.train_mlp and leaf in MLP_TARGETS)
            or (self.train_unembed and leaf == UNEMBED_TARGET)
        )


@dataclass(frozen=True)
class Datum:
    """One training example."""

    tokens: list[int]  # the model input, flattened to token ids (length N)
    loss_inputs: dict[str, np.ndarray]  # loss_fn_inputs by name, each of shape (N,)


@dataclass(frozen=True)
class AdamParams:
    """One AdamW step's hyper-parameters, as the client sends them (Tinker defaults)."""

    learning_rate: float = 1e-4  # step size
    beta1: float = 0.9  # first-moment decay
    beta2: float = 0.95  # second-moment decay
    eps: float = 1e-12  # denominator epsilon
    weight_decay: float = 0.0  # decoupled weight decay (AdamW)
    grad_clip_norm: float = 0.0  # clip the global grad norm to this; 0 = no clipping


@dataclass(frozen=True)
class CreateModelRequest:
    """Create a training model: a fresh LoRA adapter on a base model."""

    model_id: str  # "{session_id}:train:{model_seq_id}"
    base_model: str  # registered base model name
    lora: LoraConfig  # rank and targets
    seed: int | None  # adapter init seed; None = random


@dataclass(frozen=True)
class ForwardBackwardRequest:
    """Compute a loss over a batch; accumulate its gradient unless forward_only."""

    model_id: str  # the training model
    seq_id: int  # position in the model's request order (1, 2, ...)
    data: list[Datum]  # the batch
    loss_fn: str  # e.g. "cross_entropy"
    loss_config: dict[str, float | str]  # loss_fn_config (v2 merged over v1)
    forward_only: bool  # True for `forward`: no gradients touched
    custom_loss: LossGraph | None = None  # the traced loss when loss_fn == "custom"
    base_model: str = ""  # the model's base model: only requests of one base share a batch


@dataclass(frozen=True)
class OptimStepRequest:
    """Apply the accumulated gradients of one model with AdamW, then clear them."""

    model_id: str
    seq_id: int
    adam: AdamParams


@dataclass(frozen=True)
class SaveRequest:
    """Write the model's adapter to `directory` (atomically).

    kind "training" adds the optimizer state; "sampler" writes inference weights only.
    """

    model_id: str
    seq_id: int
    kind: Literal["training", "sampler"]
    directory: Path  # final folder; the runner writes a temporary sibling and renames it
    metadata: dict[str, Any]  # written into the checkpoint's lathe.json


@dataclass(frozen=True)
class SnapshotRequest:
    """Freeze the model's current adapter as a new in-memory sampler (unnamed sampler save)."""

    model_id: str
    seq_id: int
    sampler_id: str  # id of the sampling session to create
    # "inflight" (SDK 0.38): publish the weights as the model's shared inflight target; every
    # inflight sampler of the model samples each new request from the latest target
    inflight: bool = False


@dataclass(frozen=True)
class LoadRequest:
    """Load a training checkpoint into a model.

    With `create` set, the model does not exist yet and this request creates it (as its
    seq 0); otherwise it replaces the weights of an existing model at `seq_id`.
    """

    model_id: str
    seq_id: int  # 0 when creating
    directory: Path  # a training checkpoint folder
    with_optimizer: bool  # also restore AdamW moments and step counts
    create: bool  # create the model from the checkpoint (create_training_client_from_state)
    base_model: str  # base model the checkpoint was trained on


@dataclass(frozen=True)
class UnloadRequest:
    """Free the models and samplers of an ended session (their checkpoints stay)."""

    model_ids: list[str]
    sampler_ids: list[str]


@dataclass(frozen=True)
class CancelRequest:
    """Stop sample requests the client abandoned (queued ones leave the queue, running ones
    free their KV cache); each is answered with an error. Finished ones are left alone."""

    request_ids: list[str]


@dataclass(frozen=True)
class SkipRequest:
    """Consume a seq id whose request was rejected by the API, so later ones can run."""

    model_id: str
    seq_id: int


# --- sampling -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    """How to draw tokens (Tinker's SamplingParams, validated)."""

    max_tokens: int  # generated tokens at most
    temperature: float = 1.0  # 0 = greedy
    top_k: int = -1  # -1 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # None = fresh entropy
    stop_strings: tuple[str, ...] = ()  # stop when the generated text contains one
    stop_token_ids: tuple[int, ...] = ()  # stop when one of these is generated
    stop_at_eos: bool = True  # the model's EOS tokens stop too (False for `stop=[]`)


@dataclass(frozen=True)
class CreateSamplerRequest:
    """Make a sampling session from a base model, optionally with a saved adapter."""

    sampler_id: str
    base_model: str
    directory: Path | None  # a checkpoint folder with an adapter; None = the base model


@dataclass(frozen=True)
class SampleRequest:
    """Sample continuations of one prompt and/or score the prompt."""

    sampler_id: str
    prompt: list[int]  # prompt token ids
    num_samples: int  # sequences to draw
    params: SamplingParams
    prompt_logprobs: bool  # also return the logprob of every prompt token
    prompt_logprobs_last_n: int | None = None  # score only the last N prompt tokens (NaN before)
    topk_prompt_logprobs: int = 0  # the k most likely tokens at every prompt position
    topk_sample_logprobs: int = 0  # the k most likely tokens at every sampled position
    target_prompt_ids: np.ndarray | None = None  # (P-1, K) int64 ids to score; -1 = none
    base_model: str = ""  # the sampler's base model: whose KV cache it needs
    stream: bool = False  # also report tokens as they are drawn (SampleProgress), then answer


@dataclass(frozen=True)
class CheckLossRequest:
    """Trial-run a custom loss on meta tensors (no data): refuses graphs that fail or blow up."""

    graph: LossGraph


Request = (
    CreateModelRequest
    | ForwardBackwardRequest
    | OptimStepRequest
    | SaveRequest
    | SnapshotRequest
    | LoadRequest
    | SkipRequest
    | CancelRequest
    | UnloadRequest
    | CreateSamplerRequest
    | SampleRequest
    | CheckLossRequest
)


# --- results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ForwardBackwardResult:
    outputs: list[dict[str, np.ndarray]]  # per datum: "logprobs", "elementwise_loss" (N,) f32
    metrics: dict[str, float]  # "name:reduction" -> value, additive across chunks


@dataclass(frozen=True)
class OptimStepResult:
    metrics: dict[str, float]  # e.g. grad_norm, learning_rate


@dataclass(frozen=True)
class SavedCheckpoint:
    directory: Path  # where it now lives
    size_bytes: int  # total size of its files


@dataclass(frozen=True)
class TopK:
    """The k most likely tokens at each of N positions; padding cells are (0, -99999.0)."""

    token_ids: np.ndarray  # (N, k) int32
    logprobs: np.ndarray  # (N, k) float32


@dataclass(frozen=True)
class SampledSequence:
    tokens: list[int]  # generated ids, the stop token or stop text included
    logprobs: list[float]  # per generated token, under the distribution sampled from
    stop_reason: Literal["stop", "length"]
    topk: TopK | None = None  # when topk_sample_logprobs > 0


@dataclass(frozen=True)
class SampleResult:
    sequences: list[SampledSequence]
    prompt_logprobs: list[float] | None  # first entry NaN (no context); None if not asked
    prompt_topk: TopK | None = None  # when topk_prompt_logprobs > 0 (row 0 is padding)
    target_prompt_logprobs: np.ndarray | None = None  # (P-1, K) float32, 0.0 where id was -1
    prompt_cache_hit_tokens: int = 0  # prompt tokens whose keys/values were reused


@dataclass(frozen=True)
class SampleProgress:
    """Tokens a streamed sample request drew since its last progress report: not its answer,
    which follows as a SampleResult with every token."""

    tokens: list[list[int]]  # per sequence
    logprobs: list[list[float]]  # per sequence, one per token


@dataclass(frozen=True)
class Empty:
    """Result of requests that only change state (create, load, skip, snapshot)."""


Result = (
    ForwardBackwardResult
    | OptimStepResult
    | SavedCheckpoint
    | SampleResult
    | SampleProgress
    | Empty
)


# --- envelopes ------------------------------------------------------------------------------


# Whose fault a failure was; "retry": the work was lost with the engine, send it again.
Category = Literal["user", "server", "retry"]


@dataclass(frozen=True)
class Work:
    """A request on its way to the engine."""

    request_id: str  # the future's id
    request: Request
    tenant: str = ""  # who asked (for fair scheduling)


@dataclass(frozen=True)
class Done:
    """The engine's answer to one `Work`."""

    request_id: str
    result: Result | None = None
    error: str | None = None  # set when the request failed
    category: Category = "user"

    @property
    def is_progress(self) -> bool:
        """A streamed request's progress report: the request is still running."""
        return isinstance(self.result, SampleProgress)


# --- the engine itself ------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineSpec:
    """What an engine is built from (the API side derives it from the server's settings)."""

    models: dict[str, Path]  # base model name -> local Hugging Face folder
    dtype: str = "auto"  # base weights: auto (float32 on CPU, bfloat16 on GPU) | float32 | ...
    device: str = "cpu"  # torch device, e.g. "cuda:0"
    threads: int | None = None  # torch intra-op threads; None = torch's default
    microbatch_tokens: int = 16384  # tokens per training micro-batch (packed)
    checkpoint_activations_above: int = 8192  # longer micro-batches checkpoint each layer
    ranks: int = 1  # processes of the engine's torch.distributed group (engine/group.py)
    deterministic: bool = False  # batch-invariant training
    compile: str = "off"  # torch.compile of the elementwise parts: auto | on | off
    max_resident_adapters: int = 256  # training adapters in memory; idle ones swap to disk
    swap_dir: Path | None = None  # where swapped adapters go
    kv_cache_tokens: int = 65536  # KV positions per base model
    lost_model_ids: list[str] = field(default_factory=list)  # died with an earlier engine
    lost_sampler_ids: list[str] = field(default_factory=list)  # snapshots that died with it
