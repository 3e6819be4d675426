"""Training runs over REST (session-less): what `tinker run list | info` shows."""

from __future__ import annotations

from fastapi import APIRouter, Query

from lathe.api import responses as r
from lathe.api.deps import Caller, CallerDep
from lathe.store.db import SessionRow, TrainingRunRow

router = APIRouter(tags=["training runs"])


def run_of(caller: Caller, run: TrainingRunRow) -> r.TrainingRun:
    store = caller.state.store
    session = store.get(SessionRow, run.session_id)
    return r.TrainingRun.of(
        run,
        caller.user.name,
        store.checkpoints_of(run.model_id),
        store.count_steps(run.model_id, "optim_step"),
        active=session is not None and session.finished_at is None,
    )


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


@router.get("/training_runs/{model_id}/metrics")
def get_training_run_metrics(
    model_id: str,
    caller: CallerDep,
    after_seq: int = Query(0, ge=0),
    limit: int = Query(1000, ge=1, le=10000),
) -> r.TrainingRunMetrics:
    """The metrics every forward_backward and optim_step of the run reported, kept in the
    database with their results (so curves survive restarts)."""
    caller.training_run(model_id)  # 404 unless the caller's
    rows = caller.state.store.step_metrics(model_id, after_seq, limit)
    return r.TrainingRunMetrics(
        metrics=[
            r.StepMetrics(seq_id=row.seq_id, kind=row.kind, at=r.iso(row.at), metrics=row.metrics)
            for row in rows
        ],
        next_after_seq=rows[-1].seq_id if rows else after_seq,
    )
