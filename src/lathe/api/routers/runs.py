"""Training runs over REST (session-less): what `tinker run list | info` shows."""

from __future__ import annotations

from fastapi import APIRouter, Query

from lathe.api.deps import CallerDep
from lathe.api.routers.checkpoints import checkpoint_json, cursor, iso
from lathe.store.db import TrainingRunRow

router = APIRouter(tags=["training runs"])


def run_json(caller, run: TrainingRunRow) -> dict:  # noqa: ANN001 - a Caller
    checkpoints = caller.state.store.checkpoints_of(run.model_id)
    last = {kind: None for kind in ("weights", "sampler_weights")}
    for c in checkpoints:  # oldest first: the last one of each kind wins
        if c.kind in last:
            last[c.kind] = checkpoint_json(c)
    return {
        "training_run_id": run.model_id,
        "base_model": run.base_model,
        "model_owner": caller.user.name,
        "is_lora": True,
        "corrupted": False,
        "lora_rank": run.lora_rank,
        "last_request_time": iso(run.last_request_at),
        "last_checkpoint": last["weights"],
        "last_sampler_checkpoint": last["sampler_weights"],
        "user_metadata": {k: str(v) for k, v in (run.user_metadata or {}).items()},
    }


@router.get("/training_runs")
def list_training_runs(
    caller: CallerDep, limit: int = Query(20, ge=1, le=1000), offset: int = Query(0, ge=0)
) -> dict:
    """The caller's runs, newest first ("accessible" lists the same: runs are never shared)."""
    runs, total = caller.state.store.training_runs_of(caller.user_id, limit, offset)
    return {
        "training_runs": [run_json(caller, r) for r in runs],
        "cursor": cursor(offset, limit, total),
    }


@router.get("/training_runs/{model_id}")
def get_training_run(model_id: str, caller: CallerDep) -> dict:
    return run_json(caller, caller.training_run(model_id))
