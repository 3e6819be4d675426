"""Which step of a training run a request is, so that the metrics its result reports are kept
for the run's curves (GET /training_runs/{id}/metrics, the console) in the commit that stores
the result."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lathe.store.db import StepMetricsRow


@dataclass(frozen=True)
class Step:
    model_id: str
    seq_id: int
    kind: str  # forward_backward | forward | optim_step

    def record(self, result: Any) -> StepMetricsRow | None:
        metrics = getattr(result, "metrics", None)
        if not metrics:
            return None
        # non-finite values are kept as null: JSON (and PostgreSQL's json) has no NaN
        values = {k: float(v) if math.isfinite(v) else None for k, v in metrics.items()}
        return StepMetricsRow(
            model_id=self.model_id, seq_id=self.seq_id, kind=self.kind, metrics=values
        )
