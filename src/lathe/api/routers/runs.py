"""Training runs over REST (session-less): what `tinker run list | info` shows."""

from __future__ import annotations

from fastapi import APIRouter, Query

from lathe.api import responses as r
from lathe.api.deps import Caller, CallerDep
from lathe.store.db import TrainingRunRow

router = APIRouter(tags=["training runs"])


def run_of(caller: Caller, run: TrainingRunRow) -> r.TrainingRun:
    return r.TrainingRun.of(run, caller.user.name, caller.state.store.checkpoints_of(run.model_id))


@router.get("/training_runs")
def list_training_runs(
    caller: CallerDep, limit: int = Query(20, ge=1, le=1000), offset: int = Query(0, ge=0)
) -> r.TrainingRuns:
    """The caller's runs, newest first ("accessible" lists the same: runs are never shared)."""
    runs, total = caller.state.store.training_runs_of(caller.user_id, limit, offset)
    return r.TrainingRuns(
        training_runs=[run_of(caller, run) for run in runs],
        cursor=r.Cursor(offset=offset, limit=limit, total_count=total),
    )


@router.get("/training_runs/{model_id}")
def get_training_run(model_id: str, caller: CallerDep) -> r.TrainingRun:
    return run_of(caller, caller.training_run(model_id))
