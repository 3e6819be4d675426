"""Every forward_backward and optim_step's metrics are kept with its result, per run, and read
back in seq order through GET /training_runs/{id}/metrics, also after a restart."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from lathe.local_server import LocalServer

pytestmark = pytest.mark.slow


def test_step_metrics_are_kept_in_order_and_survive_a_restart(tiny_qwen3, tmp_path):
    tokens = np.random.default_rng(0).integers(3, 400, 17).tolist()
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:]},
    )
    models = {"tiny-qwen3": tiny_qwen3}
    with LocalServer(models, tmp_path) as srv:
        service = tinker.ServiceClient(base_url=srv.base_url, api_key="tml-local")
        training = service.create_lora_training_client(base_model="tiny-qwen3", rank=4).result()
        reported = []
        for _ in range(3):
            reported.append(training.forward_backward([datum], "cross_entropy").result().metrics)
            reported.append(
                training.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics
            )
        model_id = training.model_id
        http = httpx.Client(base_url=f"{srv.base_url}/api/v1", headers={"X-API-Key": "tml-x"})
        page = http.get(f"/training_runs/{model_id}/metrics").json()
        first = http.get(f"/training_runs/{model_id}/metrics", params={"limit": 2}).json()
        rest = http.get(
            f"/training_runs/{model_id}/metrics", params={"after_seq": first["next_after_seq"]}
        ).json()
        assert http.get("/training_runs/no-such-run/metrics").status_code == 404
    rows = page["metrics"]
    assert [r["kind"] for r in rows] == ["forward_backward", "optim_step"] * 3
    seqs = [r["seq_id"] for r in rows]
    assert seqs == sorted(seqs) and len(set(seqs)) == 6
    for row, metrics in zip(rows, reported, strict=True):
        assert row["metrics"] == pytest.approx(metrics)
    assert first["metrics"] + rest["metrics"] == rows
    with LocalServer(models, tmp_path) as srv:  # the same data dir, a new process
        again = httpx.get(
            f"{srv.base_url}/api/v1/training_runs/{model_id}/metrics",
            headers={"X-API-Key": "tml-x"},
        ).json()
    assert again == page
