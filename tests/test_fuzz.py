"""Hostile input against a live server: thousands of random and mutated requests.

No answer may be a 5xx, the server must stay up with bounded memory, and a well-behaved
client training at the same time (as another user) must get exactly the results it gets on
a quiet server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest
import tinker
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tinker import types

from lathe.api.wire import tinker_wire_pb2 as pb
from lathe.local_server import LocalServer

from conftest import new_session_and_model

BASE = "tiny-qwen3"
SEEN = {"requests": 0}
COMMON = settings(
    max_examples=600, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def target(tiny_qwen3, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    keys = {}
    for user in ("fuzzer", "honest"):
        r = subprocess.run(
            [sys.executable, "-m", "lathe", "keys", "create", user, "--data-dir", str(data)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        keys[user] = r.stdout.strip()
    with LocalServer({BASE: tiny_qwen3}, data, "--long-poll-seconds", "1", dev=False) as srv:
        with httpx.Client(
            base_url=f"{srv.base_url}/api/v1", timeout=30, headers={"X-API-Key": keys["fuzzer"]}
        ) as http:
            sid, model = new_session_and_model(http, BASE)
            yield srv, keys, http, sid, model


def send(http: httpx.Client, method: str, path: str, **kw) -> httpx.Response:
    r = http.request(method, path, **kw)
    SEEN["requests"] += 1
    assert r.status_code < 500, (path, r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert isinstance(r.json().get("detail"), str), r.text[:300]
    return r


def honest_training(base_url: str, key: str) -> list[float]:
    """A normal client: 6 SGD steps on fixed data, with a fixed seed."""
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints([5, 9, 13, 21, 34]),
            loss_fn_inputs={"target_tokens": [9, 13, 21, 34, 55]},
        )
    ]
    losses = []
    with tinker.ServiceClient(base_url=base_url, api_key=key) as sc:
        tc = sc.create_lora_training_client(base_model=BASE, rank=4, seed=5).result()
        for _ in range(6):
            losses.append(tc.forward_backward(data, "cross_entropy").result().metrics["loss:sum"])
            tc.optim_step(types.AdamParams(learning_rate=0.05)).result()
    return losses


def valid_body(model: str, seq: int) -> bytes:
    req = pb.ForwardBackwardRequest(model_id=model, seq_id=seq, loss_fn="cross_entropy")
    d = req.data.add()
    d.model_input.add().encoded_text.tokens = np.arange(1, 9, dtype="<i4").tobytes()
    d.loss_fn_inputs["target_tokens"].CopyFrom(
        pb.Tensor(dense=np.arange(2, 10, dtype="<i8").tobytes(), dtype=pb.DTYPE_INT64, shape=[8])
    )
    d.loss_fn_inputs["weights"].CopyFrom(
        pb.Tensor(dense=np.ones(8, "<f4").tobytes(), dtype=pb.DTYPE_FLOAT32, shape=[8])
    )
    return req.SerializeToString()


def fuzz_all(srv, keys, http, sid, model):
    PROTO = {"Content-Type": "application/x-protobuf"}

    @COMMON
    @given(st.binary(max_size=3000), st.booleans())
    def random_bytes(body, zstd):
        headers = {**PROTO, **({"Content-Encoding": "zstd"} if zstd else {})}
        send(http, "POST", "/forward_backward", content=body, headers=headers)

    @COMMON
    @given(
        st.lists(
            st.tuples(
                st.integers(0, 400), st.integers(0, 255), st.sampled_from(["flip", "cut", "insert"])
            ),
            max_size=6,
        ),
        st.integers(1, 10**9),
    )
    def mutated(edits, seq):
        body = bytearray(valid_body(model, seq))
        for pos, byte, how in edits:
            pos = pos % (len(body) + 1)
            if how == "flip" and pos < len(body):
                body[pos] ^= byte or 1
            elif how == "cut":
                del body[pos:]
            else:
                body[pos:pos] = bytes([byte])
        send(http, "POST", "/forward_backward", content=bytes(body), headers=PROTO)

    tensors = st.builds(
        lambda dtype, shape, data: pb.Tensor(dtype=dtype, shape=shape, dense=data),
        st.integers(-3, 8),
        st.lists(st.integers(-5, 2**40), max_size=3),
        st.binary(max_size=200),
    )

    @COMMON
    @given(
        st.sampled_from([model, "x", "", f"{sid}:train:99"]),
        st.integers(-(2**31), 2**31 - 1),
        st.text(max_size=20),
        st.dictionaries(st.text(max_size=12), tensors, max_size=4),
        st.binary(max_size=200),
        st.dictionaries(st.text(max_size=12), st.floats(), max_size=3),
        st.booleans(),
    )
    def structured(model_id, seq, loss_fn, inputs, tokens, config, forward_only):
        req = pb.ForwardBackwardRequest(
            model_id=model_id, seq_id=seq, loss_fn=loss_fn, forward_only=forward_only
        )
        d = req.data.add()
        d.model_input.add().encoded_text.tokens = tokens
        for k, t in inputs.items():
            d.loss_fn_inputs[k].CopyFrom(t)
        for k, v in config.items():
            req.loss_fn_config[k] = v
        send(http, "POST", "/forward_backward", content=req.SerializeToString(), headers=PROTO)

    json_values = st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.floats()
        | st.text(max_size=30),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
        ),
        max_leaves=12,
    )
    endpoints = {
        "/create_session": ["tags", "user_metadata", "sdk_version"],
        "/session_heartbeat": ["session_id"],
        "/create_model": ["session_id", "model_seq_id", "base_model", "lora_config"],
        "/get_info": ["model_id"],
        "/optim_step": ["model_id", "seq_id", "adam_params"],
        "/save_weights": ["model_id", "seq_id", "path", "overwrite"],
        "/save_weights_for_sampler": ["model_id", "seq_id", "path", "sampling_session_seq_id"],
        "/load_weights": ["path", "optimizer", "model_id", "seq_id", "session_id", "model_seq_id"],
        "/weights_info": ["tinker_path"],
        "/create_sampling_session": [
            "session_id",
            "sampling_session_seq_id",
            "base_model",
            "model_path",
        ],
        "/asample": [
            "sampling_session_id",
            "seq_id",
            "num_samples",
            "prompt",
            "sampling_params",
            "prompt_logprobs",
            "target_prompt_logprobs",
        ],
        "/retrieve_future": ["request_id"],
        "/create_custom_loss": ["session_id", "custom_loss_seq_id", "name", "inputs", "graph"],
        "/telemetry": ["events"],
        "/client/config": ["sdk_version"],
    }
    plausible = {
        "session_id": sid,
        "model_id": model,
        "base_model": BASE,
        "tinker_path": f"tinker://{model}/weights/x",
    }

    @settings(
        max_examples=600, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(st.sampled_from(sorted(endpoints)), st.data())
    def json_bodies(path, data):
        keys_ = endpoints[path]
        body = {
            k: data.draw(st.one_of(st.just(plausible.get(k)), json_values))
            for k in data.draw(st.lists(st.sampled_from(keys_), unique=True))
        }
        raw = data.draw(st.booleans())
        if raw:  # not even JSON, or JSON of the wrong type
            content = data.draw(st.binary(max_size=100))
            send(http, "POST", path, content=content, headers={"Content-Type": "application/json"})
        else:  # NaN and Infinity included, as Python's json writes them
            send(
                http,
                "POST",
                path,
                content=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )

    random_bytes()
    mutated()
    structured()
    json_bodies()


def test_fuzzed_requests_never_break_the_server(target):
    srv, keys, http, sid, model = target
    reference = honest_training(srv.base_url, keys["honest"])
    rss_before = rss_kib(srv.proc.pid)
    result: dict = {}
    honest = threading.Thread(
        target=lambda: result.setdefault("losses", honest_training(srv.base_url, keys["honest"]))
    )
    honest.start()
    fuzz_all(srv, keys, http, sid, model)
    honest.join(timeout=300)
    assert SEEN["requests"] >= 2000
    assert srv.alive()
    assert send(http, "GET", "/healthz").status_code == 200
    growth_mib = (rss_kib(srv.proc.pid) - rss_before) / 1024
    assert growth_mib < 300, f"server memory grew by {growth_mib:.0f} MiB"
    # the honest client, training next to the fuzzer, got exactly the quiet server's results
    assert result["losses"] == reference
    assert reference[-1] < reference[0]
    os.environ.pop("HYPOTHESIS_SEED", None)
