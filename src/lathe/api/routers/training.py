"""Training models: create, describe, forward/backward, optimizer steps, save and load."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from lathe.api import checkpoint_saves, training_work
from lathe.api import responses as r
from lathe.api import schemas as s
from lathe.api.deps import CallerDep
from lathe.store import checkpoint_files

router = APIRouter(tags=["training"])


@router.post("/create_model")
def create_model(body: s.CreateModel, caller: CallerDep) -> r.QueuedForModel:
    return training_work.create_model(caller, body)


@router.post("/get_info")
def get_info(body: s.ModelRef, caller: CallerDep) -> r.ModelInfo:
    run = caller.training_run(body.model_id)
    return r.ModelInfo.of(run, caller.state.catalog.get(run.base_model))


@router.post("/forward_backward")
async def forward_backward(request: Request, caller: CallerDep) -> r.QueuedForModel:
    body = await request.body()
    encoding = request.headers.get("content-encoding", "")
    # Decoding and checking a large batch is CPU work: keep it off the event loop.
    return await run_in_threadpool(training_work.forward_backward, caller, body, encoding)


@router.post("/optim_step")
def optim_step(body: s.OptimStep, caller: CallerDep) -> r.QueuedForModel:
    return training_work.optim_step(caller, body)


@router.post("/save_weights")
def save_weights(body: s.SaveWeights, caller: CallerDep) -> r.QueuedForModel:
    return checkpoint_saves.save_weights(caller, body)


@router.post("/save_weights_external")
def save_weights_external(body: s.SaveWeightsExternal, caller: CallerDep) -> r.QueuedForModel:
    """A downloadable PEFT adapter folder (`external_weights_urls` lists its files)."""
    return checkpoint_saves.save_weights_external(caller, body)


@router.post("/save_weights_for_sampler")
def save_weights_for_sampler(body: s.SaveWeightsForSampler, caller: CallerDep) -> r.QueuedForModel:
    return checkpoint_saves.save_weights_for_sampler(caller, body)


@router.post("/load_weights")
def load_weights(body: s.LoadWeights, caller: CallerDep) -> r.QueuedForModel:
    return training_work.load_weights(caller, body)


@router.post("/weights_info")
def weights_info(body: s.WeightsInfo, caller: CallerDep) -> r.WeightsInfo:
    ckpt = caller.checkpoint(body.tinker_path)
    return r.WeightsInfo.of(checkpoint_files.read_metadata(ckpt.directory_path))
