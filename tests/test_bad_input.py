"""Bad input gets a clear 4xx with a JSON `detail`, and the server keeps serving."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from lathe.api.wire import tinker_wire_pb2 as pb

from conftest import API_KEY, fwdbwd_body

BASE = "tiny-qwen3"


def assert_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    for w in words:
        assert w in detail, detail


def test_missing_or_malformed_api_key_is_401(server):
    url = f"{server.base_url}/api/v1/get_server_capabilities"
    assert_error(httpx.get(url), 401, "X-API-Key")
    assert_error(httpx.get(url, headers={"X-API-Key": "sk-123"}), 401, "tml-")
    assert_error(httpx.get(url, headers={"X-API-Key": "tml-"}), 401)
    assert httpx.get(url, headers={"X-API-Key": API_KEY}).status_code == 200


def test_unknown_base_model_and_bad_rank(service, server):
    with pytest.raises(tinker.BadRequestError, match="unknown base_model"):
        service.create_lora_training_client(base_model="no/such-model", rank=8).result()
    for rank in (0, 129):
        with pytest.raises(tinker.BadRequestError, match="rank"):
            service.create_lora_training_client(base_model=BASE, rank=rank).result()
    assert server.alive()


def test_token_ids_outside_vocabulary(service, server):
    tc = service.create_lora_training_client(base_model=BASE, rank=4).result()
    vocab = tc.get_tokenizer().vocab_size + 1000
    bad = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, vocab]),
        loss_fn_inputs={"target_tokens": [2, 3, 4]},
    )
    with pytest.raises(tinker.BadRequestError, match="outside the vocabulary"):
        tc.forward_backward([bad], "cross_entropy").result()
    bad_target = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={"target_tokens": [2, 3, -1]},
    )
    with pytest.raises(tinker.BadRequestError, match="outside the vocabulary"):
        tc.forward_backward([bad_target], "cross_entropy").result()
    # the refused requests used up their seq ids: the same client keeps training
    good = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={"target_tokens": [2, 3, 4]},
    )
    assert tc.forward_backward([good], "cross_entropy").result().metrics["loss:sum"] > 0
    tc.optim_step(types.AdamParams()).result()
    assert server.alive()


def test_malformed_protobuf_and_inconsistent_tensors(http, service):
    tc = service.create_lora_training_client(base_model=BASE, rank=4).result()
    headers = {"Content-Type": "application/x-protobuf"}
    r = http.post("/forward_backward", content=b"\xff\xff\xff\x00garbage", headers=headers)
    assert_error(r, 400, "protobuf")
    # shape says 5 but 3 values follow
    req = pb.ForwardBackwardRequest(model_id=tc.model_id, seq_id=1, loss_fn="cross_entropy")
    d = req.data.add()
    d.model_input.add().encoded_text.tokens = np.asarray([1, 2, 3], "<i4").tobytes()
    d.loss_fn_inputs["target_tokens"].CopyFrom(
        pb.Tensor(dense=np.asarray([1, 2, 3], "<i8").tobytes(), dtype=pb.DTYPE_INT64, shape=[5])
    )
    assert_error(
        http.post("/forward_backward", content=req.SerializeToString(), headers=headers),
        400,
        "shape",
    )
    # targets of the wrong length
    body = fwdbwd_body(tc.model_id, 2, [1, 2, 3], [1, 2])
    assert_error(http.post("/forward_backward", content=body, headers=headers), 400, "shape")
    # unknown loss
    req = pb.ForwardBackwardRequest.FromString(fwdbwd_body(tc.model_id, 3, [1, 2], [2, 3]))
    req.loss_fn = "mystery"
    assert_error(
        http.post("/forward_backward", content=req.SerializeToString(), headers=headers),
        400,
        "mystery",
    )
    req.seq_id, req.loss_fn = 4, "stable_reinforce"  # a known loss lathe cannot serve
    assert_error(
        http.post("/forward_backward", content=req.SerializeToString(), headers=headers),
        400,
        "importance_sampling",
    )


def test_unknown_ids_are_404(http):
    headers = {"Content-Type": "application/x-protobuf"}
    body = fwdbwd_body("sess-nope:train:0", 1, [1, 2], [2, 3])
    assert_error(http.post("/forward_backward", content=body, headers=headers), 404, "model")
    assert_error(
        http.post("/optim_step", json={"model_id": "sess-nope:train:0", "seq_id": 1}),
        404,
        "sess-nope:train:0",
    )
    assert_error(http.post("/get_info", json={"model_id": "x:train:9"}), 404)
    assert_error(http.post("/retrieve_future", json={"request_id": "req-nope"}), 404)
    assert_error(
        http.post("/asample", json={"sampling_session_id": "x:sample:0", "prompt": {"chunks": []}}),
        404,
    )
    assert_error(http.get("/training_runs/x:train:0/checkpoints"), 404)
    assert_error(
        http.post(
            "/create_model", json={"session_id": "nope", "model_seq_id": 0, "base_model": BASE}
        ),
        404,
        "session",
    )


def test_invalid_json_and_paths(http, service):
    assert_error(
        http.post(
            "/create_session", content=b"{not json", headers={"Content-Type": "application/json"}
        ),
        400,
    )
    tc = service.create_lora_training_client(base_model=BASE, rank=4).result()
    r = http.post("/save_weights", json={"model_id": tc.model_id, "seq_id": 1, "path": "../../etc"})
    assert_error(r, 400, "invalid checkpoint name")
    r = http.post(
        "/load_weights", json={"model_id": tc.model_id, "seq_id": 2, "path": "tinker://x/weights"}
    )
    assert_error(r, 400, "invalid path")
    r = http.post(
        "/load_weights",
        json={"model_id": tc.model_id, "seq_id": 2, "path": f"tinker://{tc.model_id}/weights/none"},
    )
    assert_error(r, 404, "not found")


def test_server_still_serves_after_bad_input(service, server):
    assert server.alive()
    tc = service.create_lora_training_client(base_model=BASE, rank=4).result()
    good = types.Datum(
        model_input=types.ModelInput.from_ints([5, 6, 7]),
        loss_fn_inputs={"target_tokens": [6, 7, 8]},
    )
    assert tc.forward([good], "cross_entropy").result().metrics["loss:sum"] > 0


def test_refused_load_and_save_do_not_block_the_model(service, server):
    tc = service.create_lora_training_client(base_model=BASE, rank=4).result()
    good = types.Datum(
        model_input=types.ModelInput.from_ints([5, 6, 7]),
        loss_fn_inputs={"target_tokens": [6, 7, 8]},
    )
    with pytest.raises(tinker.NotFoundError):
        tc.load_state(f"tinker://{tc.model_id}/weights/missing").result()
    tc.save_state("first").result()
    with pytest.raises(tinker.BadRequestError, match="exists"):
        tc.save_state("first").result()
    assert tc.forward([good], "cross_entropy").result().metrics["loss:sum"] > 0
    assert server.alive()


def rl_datum(n: int, **extra) -> types.Datum:
    inputs = {
        "target_tokens": list(range(1, n + 1)),
        "logprobs": [-1.0] * n,
        "advantages": [0.5] * n,
        **extra,
    }
    return types.Datum(
        model_input=types.ModelInput.from_ints(list(range(n))), loss_fn_inputs=inputs
    )


@pytest.mark.parametrize(
    ("loss_fn", "datum", "config", "message"),
    [
        ("ppo", rl_datum(3), {"clip_epsilon": 0.2}, "clip_epsilon"),
        (
            "ppo",
            rl_datum(3),
            {"clip_low_threshold": 1.5, "clip_high_threshold": 1.2},
            "clip_low_threshold",
        ),
        ("dro", rl_datum(3), {"beta": -1.0}, "beta"),
        ("importance_sampling", rl_datum(3, weights=[1.0, 1.0, 1.0]), None, "weights"),
        (
            "ppo",
            types.Datum(
                model_input=types.ModelInput.from_ints([1, 2, 3]),
                loss_fn_inputs={"target_tokens": [1, 2, 3], "logprobs": [0.0] * 3},
            ),
            None,
            "advantages",
        ),
        ("importance_sampling", rl_datum(3, advantages=[0.5, 0.5]), None, "advantages"),
        ("cross_entropy", rl_datum(3), None, "logprobs"),
        ("stable_reinforce", rl_datum(3), None, "stable_reinforce"),
    ],
)
def test_loss_inputs_and_config_errors_name_the_key(service, loss_fn, datum, config, message):
    tc = service.create_lora_training_client(base_model=BASE, rank=4).result()
    with pytest.raises(tinker.BadRequestError, match=message):
        tc.forward_backward([datum], loss_fn, config).result()
    # the refused request used up its seq id; the client keeps working
    ok = rl_datum(3)
    assert tc.forward_backward([ok], "importance_sampling").result().metrics["loss:sum"] != 0


def test_sequences_longer_than_the_context_are_refused(service, tiny_qwen3):
    import json

    context = json.loads((tiny_qwen3 / "config.json").read_text())["max_position_embeddings"]
    tc = service.create_lora_training_client(base_model=BASE, rank=4).result()
    long = types.Datum(
        model_input=types.ModelInput.from_ints([1] * (context + 1)),
        loss_fn_inputs={"target_tokens": [1] * (context + 1)},
    )
    with pytest.raises(tinker.BadRequestError, match="at most"):
        tc.forward_backward([long], "cross_entropy").result()
    sampler = service.create_sampling_client(base_model=BASE).result()
    with pytest.raises(tinker.BadRequestError, match="at most|exceeds"):
        sampler.sample(
            types.ModelInput.from_ints([1] * (context + 1)), 1, types.SamplingParams(max_tokens=1)
        ).result()


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_in_json_are_refused(http, service, value):
    tc = service.create_lora_training_client(base_model=BASE, rank=4).result()
    body = json.dumps({"model_id": tc.model_id, "seq_id": 1, "adam_params": {}})
    body = body.replace("{}", '{"learning_rate": ' + value + "}")
    r = http.post("/optim_step", content=body, headers={"Content-Type": "application/json"})
    assert_error(r, 400, "learning_rate")
    good = types.Datum(
        model_input=types.ModelInput.from_ints([5, 6, 7]),
        loss_fn_inputs={"target_tokens": [6, 7, 8]},
    )
    assert tc.forward([good], "cross_entropy").result().metrics["loss:sum"] > 0
