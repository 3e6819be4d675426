"""The state of one admitted request: its prompt's prefill, then one `Sequence` per sample."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from lathe.protocol import messages as m
from lathe.sampling.kv_cache import SequenceKV
from lathe.sampling.stops import StopChecker

if TYPE_CHECKING:  # the engine imports this module; Weights is its input type
    from lathe.sampling.engine import Weights


@dataclass
class Sequence:
    """One sample being decoded."""

    kv: SequenceKV
    stream: int  # its random stream (sampling/draw.py)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    stop_reason: str | None = None
    reported: int = 0  # tokens already sent in progress reports (streamed requests)
    # logits its first token is drawn from, until that draw (in the next sampler step)
    first_logits: torch.Tensor | None = None


@dataclass
class Job:
    """One admitted request: its prompt's prefill, then its samples."""

    work_id: str
    req: m.SampleRequest
    weights: Weights
    stop: StopChecker
    reserved: int  # KV blocks reserved for it
    prompt_kv: SequenceKV | None = None
    prefilled: int = 0  # prompt tokens prefilled so far
    # Prompt scores, per prefill chunk, kept on the device until the request finishes:
    prompt_scores: list[torch.Tensor] = field(default_factory=list)  # logp of prompt[i], i >= 1
    prompt_topk: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (n, k)
    target_scores: list[torch.Tensor] = field(default_factory=list)  # (n, K)
    sequences: list[Sequence] = field(default_factory=list)
    cache_hit: int = 0
    # KV namespace of an inflight sampling session: its prefixes are shared with no other
    namespace: str | None = None

    @property
    def wants_prompt_logits(self) -> bool:
        r = self.req
        return r.prompt_logprobs or r.topk_prompt_logprobs > 0 or r.target_prompt_ids is not None

    @property
    def prefilling(self) -> bool:
        return not self.sequences


def cache_key(job: Job) -> tuple:
    return (id(job.weights.model), id(job.weights.adapter), job.namespace, tuple(job.req.prompt))
