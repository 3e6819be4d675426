"""Over raw HTTP: out-of-order arrival, replayed POSTs, and failed futures."""

from __future__ import annotations

import shutil

import httpx
import pytest
import tinker

from lathe.api.wire import tinker_wire_pb2 as pb

from conftest import API_KEY, await_future, fwdbwd_body, new_session_and_model

BASE = "tiny-qwen3"
PROTO = {"Content-Type": "application/x-protobuf"}


def new_model(http: httpx.Client) -> str:
    return new_session_and_model(http, BASE)[1]


def fwdbwd(model_id: str, seq: int, forward_only: bool = False) -> bytes:
    return fwdbwd_body(model_id, seq, list(range(5, 25)), list(range(6, 26)), forward_only)


def loss_of(r: httpx.Response) -> float:
    return pb.ForwardBackwardOutput.FromString(r.content).metrics["loss:sum"]


def optim(model_id: str, seq: int) -> dict:
    return {"model_id": model_id, "seq_id": seq, "adam_params": {"learning_rate": 0.05}}


def test_optim_step_posted_before_its_gradients_waits_for_them(http):
    model = new_model(http)
    step = http.post("/optim_step", json=optim(model, 2)).json()["request_id"]
    grads = http.post("/forward_backward", content=fwdbwd(model, 1), headers=PROTO)
    step_metrics = await_future(http, step).json()["metrics"]
    assert step_metrics["grad_norm"] > 0 and "skipped" not in step_metrics
    assert loss_of(await_future(http, grads.json()["request_id"])) > 0


def test_replayed_posts_return_the_same_future_and_apply_once(http):
    model = new_model(http)
    first = http.post("/forward_backward", content=fwdbwd(model, 1), headers=PROTO).json()
    again = http.post("/forward_backward", content=fwdbwd(model, 1), headers=PROTO).json()
    assert first["request_id"] == again["request_id"]
    step = http.post("/optim_step", json=optim(model, 2)).json()
    assert http.post("/optim_step", json=optim(model, 2)).json() == step
    await_future(http, step["request_id"])
    after_one = loss_of(
        await_future(
            http,
            http.post("/forward_backward", content=fwdbwd(model, 3, True), headers=PROTO).json()[
                "request_id"
            ],
        )
    )
    assert http.post("/optim_step", json=optim(model, 2)).json() == step  # after it ran, too
    after_replay = loss_of(
        await_future(
            http,
            http.post("/forward_backward", content=fwdbwd(model, 4, True), headers=PROTO).json()[
                "request_id"
            ],
        )
    )
    assert after_replay == after_one


def test_engine_failures_reach_the_sdk_as_failed_futures(server):
    with tinker.ServiceClient(base_url=server.base_url, api_key=API_KEY) as sc:
        tc = sc.create_lora_training_client(base_model=BASE, rank=4).result()
        path = tc.save_state("damaged").result().path
        ckpt_dir = server.data_dir / "checkpoints" / tc.model_id / "weights" / "damaged"
        (ckpt_dir / "optimizer.safetensors").unlink()  # damaged behind the server's back
        with pytest.raises(tinker.RequestFailedError, match="damaged: optimizer.safetensors"):
            sc.create_training_client_from_state_with_optimizer(path).result()
        shutil.rmtree(ckpt_dir)
        with pytest.raises(tinker.NotFoundError, match="files are missing"):
            sc.create_training_client_from_state(path).result()
    assert server.alive()


def test_clients_that_vanish_mid_long_poll_do_not_disturb_the_server(http, server):
    """Twenty long polls of a running sample are cut by their clients (a read timeout closes
    the connection): the server serves on at once, and the request's result still arrives
    whole for a client that waits."""
    sid, model_id = new_session_and_model(http, BASE)
    snap = {"model_id": model_id, "seq_id": 1, "sampling_session_seq_id": 0}
    made = http.post("/save_weights_for_sampler", json=snap).json()
    sampler_id = await_future(http, made["request_id"]).json()["sampling_session_id"]
    sample = {
        "sampling_session_id": sampler_id,
        "seq_id": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": list(range(3, 20))}]},
        "sampling_params": {"max_tokens": 200, "temperature": 1.0},
        "num_samples": 8,
    }
    request_id = http.post("/asample", json=sample).json()["request_id"]
    cut = 0
    for _ in range(20):
        try:
            http.post("/retrieve_future", json={"request_id": request_id}, timeout=0.05)
        except httpx.TimeoutException:
            cut += 1
    assert cut > 0  # some polls were still waiting when their client left
    assert http.get("/healthz", timeout=2).status_code == 200
    answer = pb.SampleResponse.FromString(await_future(http, request_id).content)
    assert len(answer.sequences) == 8
