"""Sampling sessions and sampling (`sample` and `compute_logprobs` both arrive as /asample)."""

from __future__ import annotations

from fastapi import APIRouter

from lathe.api import responses as r
from lathe.api import sampling_work
from lathe.api import schemas as s
from lathe.api.deps import CallerDep
from lathe.store import completions

router = APIRouter(tags=["sampling"])


@router.post("/create_sampling_session")
def create_sampling_session(
    body: s.CreateSamplingSession, caller: CallerDep
) -> r.SamplingSessionCreated:
    return sampling_work.create_sampling_session(caller, body)


@router.get("/samplers/{sampler_id}")
def get_sampler(sampler_id: str, caller: CallerDep) -> r.SamplerInfo:
    row = caller.sampler(sampler_id)
    return r.SamplerInfo(
        sampler_id=row.sampler_id, base_model=row.base_model, model_path=row.model_path
    )


@router.post("/join_sampling_session")
def join_sampling_session(body: s.JoinSamplingSession, caller: CallerDep) -> r.ClientCounter:
    """A copy of a SamplingClient (unpickled, say) asks for its clone number (SDK 0.38, client
    config sample_join_sampling_session); its seq ids then start at n * 1e9."""
    caller.sampler(body.sampling_session_id)  # 404 unless the caller's
    counter = completions.join(caller.state.store, body.sampling_session_id)
    return r.ClientCounter(client_counter=counter)


@router.post("/asample")
def asample(body: s.Sample, caller: CallerDep) -> r.QueuedSample:
    return sampling_work.sample(caller, body)
