"""`lathe serve` runs the engine in a process of its own: the API process never loads torch,
and when the engine process dies the API stays up, fails what was in flight with a retryable
error, starts a new engine, and serves the next request."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types

from lathe.local_server import LocalServer

from conftest import API_KEY, await_future, fwdbwd_body, new_session_and_model

BASE = "tiny-qwen3"


def mapped_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def engine_status(server: LocalServer) -> dict:
    r = httpx.get(f"{server.base_url}/api/v1/status", headers={"X-API-Key": API_KEY})
    assert r.status_code == 200, r.text
    return r.json()["engine"]


def datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc (Linux)")
def test_the_api_process_never_loads_torch(server, service):
    tc = service.create_lora_training_client(base_model=BASE, rank=4).result()
    tc.forward_backward([datum([1, 2, 3, 4, 5])], "cross_entropy").result()
    engine = engine_status(server)
    assert engine["mode"] == "own_process" and engine["state"] == "running"
    assert engine["pid"] != server.proc.pid
    # The check can fail: the engine process, which trains, has torch's library mapped.
    assert "libtorch" in mapped_libraries(engine["pid"])
    assert "libtorch" not in mapped_libraries(server.proc.pid)


@pytest.mark.slow
def test_a_killed_engine_fails_in_flight_work_retryably_and_is_restarted(
    tiny_qwen3, tmp_path, monkeypatch
):
    monkeypatch.setenv("LATHE_FAULTS", "save_delay=5")  # a save that is surely in flight
    with (
        LocalServer({BASE: tiny_qwen3}, tmp_path / "data", "--long-poll-seconds", "2") as srv,
        httpx.Client(
            base_url=f"{srv.base_url}/api/v1", headers={"X-API-Key": API_KEY}, timeout=30
        ) as http,
    ):
        sid, model_id = new_session_and_model(http, BASE)
        snap = {"model_id": model_id, "seq_id": 1, "sampling_session_seq_id": 0}
        snapshot = http.post("/save_weights_for_sampler", json=snap).json()
        sampler_id = await_future(http, snapshot["request_id"]).json()["sampling_session_id"]
        first = engine_status(srv)
        save = http.post("/save_weights", json={"model_id": model_id, "seq_id": 2, "path": "x"})
        time.sleep(1.0)
        os.kill(first["pid"], signal.SIGKILL)
        # 410 is what the SDK retries a sample on (RetryableException for other futures)
        lost = await_future(http, save.json()["request_id"], allow=(410,))
        assert lost.status_code == 410 and "engine process stopped" in lost.json()["detail"]
        assert http.get("/healthz").status_code == 200
        deadline = time.monotonic() + 120
        while (now := engine_status(srv))["state"] != "running" or now["pid"] == first["pid"]:
            assert time.monotonic() < deadline, now
            time.sleep(0.2)
        assert now["restarts"] == 1 and now["lost_training_models"] == 1
        assert now["lost_samplers"] == 1
        # The model lived in the dead engine's memory: its requests fail at once, saying so.
        r = http.post(
            "/forward_backward",
            content=fwdbwd_body(model_id, 3, [1, 2, 3], [2, 3, 4]),
            headers={"Content-Type": "application/x-protobuf"},
        )
        answer = await_future(http, r.json()["request_id"]).json()
        assert "lost when the engine process restarted" in answer["error"]
        # So did the unnamed snapshot sampler of that model.
        sample = {
            "sampling_session_id": sampler_id,
            "seq_id": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
            "sampling_params": {"max_tokens": 2},
            "num_samples": 1,
        }
        answer = await_future(http, http.post("/asample", json=sample).json()["request_id"])
        assert "engine process that has since restarted" in answer.json()["error"]
        # New work runs on the new engine, through the SDK as usual.
        with tinker.ServiceClient(base_url=srv.base_url, api_key=API_KEY) as sc:
            fresh = sc.create_lora_training_client(base_model=BASE, rank=4).result()
            out = fresh.forward_backward([datum([1, 2, 3, 4, 5])], "cross_entropy").result()
            assert out.metrics["loss:sum"] > 0
            sampler = sc.create_sampling_client(base_model=BASE)
            res = sampler.sample(
                types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=3)
            ).result(timeout=60)
            assert len(res.sequences[0].tokens) == 3


@pytest.mark.parametrize("point", ["forward_backward", "optim_step", "save"])
def test_an_engine_crash_at_a_chosen_point_loses_nothing_saved(
    point, tiny_qwen3, tmp_path, monkeypatch
):
    """The engine process dies mid forward_backward, mid optim_step or mid save (files written,
    not yet in place): the request fails, the API stays up, the engine comes back, the
    half-done save is not listed, and the run goes on from its last checkpoint exactly."""
    armed = tmp_path / "crashed"  # present: disarmed; removed: the next `point` crashes once
    armed.touch()
    monkeypatch.setenv("LATHE_FAULTS", f"crash_at={point},crash_once={armed}")
    with LocalServer({BASE: tiny_qwen3}, tmp_path / "data", "--long-poll-seconds", "2") as srv:
        with tinker.ServiceClient(base_url=srv.base_url, api_key=API_KEY) as sc:
            tc = sc.create_lora_training_client(base_model=BASE, rank=4).result()
            data = [datum(list(range(3, 30)))]
            tc.forward_backward(data, "cross_entropy").result()
            tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            safe = tc.save_state("safe").result().path
            expected = tc.forward(data, "cross_entropy").result().metrics["loss:sum"]
            first = engine_status(srv)
            armed.unlink()
            with pytest.raises(Exception):  # noqa: B017 - the SDK's error type varies by request
                if point == "forward_backward":
                    tc.forward_backward(data, "cross_entropy").result()
                elif point == "optim_step":
                    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
                else:
                    tc.save_state("doomed").result()
            assert armed.exists()  # it did crash there
            deadline = time.monotonic() + 120
            while (now := engine_status(srv))["state"] != "running" or now["pid"] == first["pid"]:
                assert time.monotonic() < deadline, now
                time.sleep(0.2)
            rest = tinker.RestClient(base_url=srv.base_url, api_key=API_KEY)
            listed = [
                c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints
            ]
            assert listed == [safe]
            again = sc.create_training_client_from_state(safe).result()
            assert again.forward(data, "cross_entropy").result().metrics["loss:sum"] == expected
            again.forward_backward(data, "cross_entropy").result()
            again.optim_step(types.AdamParams(learning_rate=1e-2)).result()
