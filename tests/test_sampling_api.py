"""The sampling contract through the official SDK and raw HTTP against `lathe serve`."""

from __future__ import annotations

import concurrent.futures
import time

import numpy as np
import pytest
import tinker
from tinker import types

from lathe.local_server import LocalServer

from conftest import await_future

BASE = "tiny-qwen3"
PROMPT = [11, 42, 7, 99, 250, 3, 17]


@pytest.fixture(scope="module")
def server(tiny_qwen3, tmp_path_factory):
    # A small queue and a small KV budget, so backpressure and waiting are easy to reach.
    args = ("--long-poll-seconds", "2", "--max-pending-samples", "4", "--kv-cache-tokens", "4096")
    with LocalServer({BASE: tiny_qwen3}, tmp_path_factory.mktemp("data"), *args) as server:
        yield server


@pytest.fixture(scope="module")
def sampler(service):
    return service.create_sampling_client(base_model=BASE).result()


def greedy(sampler, max_tokens=12, **kw):
    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)
    return sampler.sample(types.ModelInput.from_ints(PROMPT), 1, params).result().sequences[0]


def test_stop_strings_spanning_tokens_token_ids_and_empty_stop(sampler, service):
    tok = service.create_lora_training_client(base_model=BASE, rank=4).result().get_tokenizer()
    base = greedy(sampler, stop=[])
    assert len(base.tokens) == 12 and base.stop_reason == "length"  # stop=[]: no stop at all
    texts = [tok.decode(base.tokens[:i]) for i in range(len(base.tokens) + 1)]
    for i in range(1, len(base.tokens) - 1):
        at, after = texts[i + 1], texts[i + 2]
        if len(at) > len(texts[i]) and len(after) > len(at) and at[-1] + after[len(at)] not in at:
            stop = at[-1] + after[len(at)]  # last character of token i, first of token i+1
            break
    else:
        pytest.skip("no suitable token boundary in this greedy continuation")
    seq = greedy(sampler, stop=[stop])
    assert seq.tokens == base.tokens[: i + 2] and seq.stop_reason == "stop"
    seq = greedy(sampler, stop=stop)  # a single string works too
    assert seq.tokens == base.tokens[: i + 2]
    stop_id = base.tokens[4]
    seq = greedy(sampler, stop=[stop_id])
    assert seq.tokens == base.tokens[: base.tokens.index(stop_id) + 1]
    assert seq.stop_reason == "stop"


def test_sampled_logprobs_match_the_trainer(service, sampler):
    tc = service.create_lora_training_client(base_model=BASE, rank=4).result()
    params = types.SamplingParams(max_tokens=10, temperature=1.0, seed=9)
    seq = sampler.sample(types.ModelInput.from_ints(PROMPT), 1, params).result().sequences[0]
    full = PROMPT + seq.tokens
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(full[:-1]),
        loss_fn_inputs={"target_tokens": full[1:]},
    )
    trained = np.asarray(
        tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    )
    scored = sampler.compute_logprobs(types.ModelInput.from_ints(full)).result()
    np.testing.assert_allclose(scored[1:], trained, atol=1e-5)
    # at temperature 1 the sampled tokens' logprobs are the model's own
    np.testing.assert_allclose(seq.logprobs, trained[len(PROMPT) - 1 :], atol=1e-5)


def test_old_snapshots_keep_their_weights(service):
    tc = service.create_lora_training_client(base_model=BASE, rank=8, seed=3).result()
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(PROMPT[:-1]),
        loss_fn_inputs={"target_tokens": PROMPT[1:]},
    )

    def train(steps):
        for _ in range(steps):
            tc.forward_backward([datum], "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=0.05)).result()

    train(2)
    s1 = tc.save_weights_and_get_sampling_client().result()
    first = greedy(s1, stop=[]).tokens
    train(3)
    s2 = tc.save_weights_and_get_sampling_client().result()
    assert greedy(s1, stop=[]).tokens == first
    assert greedy(s2, stop=[]).tokens != first


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"max_tokens": 4, "top_p": 0.0}, "top_p"),
        ({"max_tokens": 4, "top_p": 1.5}, "top_p"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 4, "temperature": -0.5}, "temperature"),
        ({"max_tokens": 4, "top_k": 0}, "top_k"),
        ({"max_tokens": 5000}, "exceeds the context"),
    ],
)
def test_bad_sampling_parameters_are_refused(http, sampler, params, message):
    body = {
        "sampling_session_id": sampler._sampling_session_id,
        "seq_id": 10_000 + len(message),
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]},
        "sampling_params": params,
        "num_samples": 1,
    }
    r = http.post("/asample", json=body)
    assert r.status_code == 400 and message in r.json()["detail"], r.text


def test_unknown_sampler_and_too_long_prompt(http, sampler):
    body = {
        "sampling_session_id": "sess-x:sample:0",
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]},
        "sampling_params": {"max_tokens": 1},
    }
    r = http.post("/asample", json=body)
    assert r.status_code == 404 and "sess-x:sample:0" in r.json()["detail"]
    with pytest.raises(tinker.BadRequestError, match="at most"):
        sampler.sample(
            types.ModelInput.from_ints([5] * 3000), 1, types.SamplingParams(max_tokens=1)
        ).result()
    # stable_reinforce's sampling-side record is refused up front, with the way on
    stable = {**body, "sampling_session_id": sampler._sampling_session_id}
    r = http.post("/asample", json={**stable, "record_stability_info": True})
    assert r.status_code == 400 and "importance_sampling" in r.json()["detail"]


def test_backpressure_is_429_and_nothing_is_dropped(http, sampler):
    body = {
        "sampling_session_id": sampler._sampling_session_id,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]},
        "sampling_params": {"max_tokens": 60, "stop": []},
        "num_samples": 1,
    }
    statuses = [http.post("/asample", json={**body, "seq_id": 20_000 + i}) for i in range(8)]
    codes = [r.status_code for r in statuses]
    assert 429 in codes and codes[:4] == [200] * 4
    refused = next(r for r in statuses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and "queue" in refused.json()["detail"]
    # the SDK backs off on 429 and re-posts: many concurrent samples all complete
    params = types.SamplingParams(max_tokens=5, temperature=1.0)
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        futures = [
            pool.submit(
                lambda s: sampler.sample(
                    types.ModelInput.from_ints(PROMPT),
                    1,
                    types.SamplingParams(**{**params.model_dump(), "seed": s}),
                ).result(),
                s,
            )
            for s in range(12)
        ]
        results = [f.result(timeout=120) for f in futures]
    assert all(len(r.sequences[0].tokens) >= 1 for r in results)


def long_samples(sampler) -> dict:
    """An /asample body of two 1,900-token samples: most of the 4,096-position KV budget."""
    return {
        "sampling_session_id": sampler._sampling_session_id,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]},
        "sampling_params": {"max_tokens": 1900, "stop": []},
        "num_samples": 2,
    }


def test_waiting_for_kv_memory_is_reported_in_queue_state(http, sampler):
    # two samples of 1,900 tokens reserve most of the 4096-position budget, so requests run
    # one at a time; decoding 1,900 steps outlasts a long poll (2 s), so the second
    # request's poll answers while it still waits for memory
    body = long_samples(sampler)
    time.sleep(1.0)  # let earlier tests' requests drain
    ids = [
        http.post("/asample", json={**body, "seq_id": 30_000 + i}).json()["request_id"]
        for i in range(2)
    ]
    states = set()
    while True:
        r = http.post("/retrieve_future", json={"request_id": ids[1]})
        if "protobuf" in r.headers["content-type"]:
            break
        states.add(r.json().get("queue_state"))
    assert "paused_capacity" in states
    first = http.post("/retrieve_future", json={"request_id": ids[0]})
    assert "protobuf" in first.headers["content-type"]


def to_dense(t: types.TensorData, pad: float) -> np.ndarray:
    data = np.asarray(t.data)
    if not t.sparse_crow_indices:
        return data.reshape(t.shape)
    dense = np.full(t.shape, pad, dtype=data.dtype)
    crow = np.asarray(t.sparse_crow_indices)
    dense[np.repeat(np.arange(t.shape[0]), np.diff(crow)), t.sparse_col_indices] = data
    return dense


def test_target_prompt_logprobs_dense_and_sparse(sampler):
    prompt = types.ModelInput.from_ints(PROMPT)
    full = sampler.compute_logprobs(prompt).result()
    n = len(PROMPT) - 1
    ids = np.full((n, 3), -1, dtype=np.int64)
    ids[:, 0] = PROMPT[1:]  # the actual next tokens
    ids[2, 1], ids[4, 2] = 5, 77
    rows, cols = np.nonzero(ids >= 0)
    crow = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]).tolist()
    dense = types.TensorData(data=ids.reshape(-1).tolist(), dtype="int64", shape=[n, 3])
    sparse = types.TensorData(
        data=ids[rows, cols].tolist(),
        dtype="int64",
        shape=[n, 3],
        sparse_crow_indices=crow,
        sparse_col_indices=cols.tolist(),
    )
    for target in (dense, sparse):
        res = sampler.sample(
            prompt, 1, types.SamplingParams(max_tokens=1), target_prompt_logprobs=target
        ).result()
        out = res.target_prompt_logprobs
        assert bool(out.sparse_crow_indices) == bool(target.sparse_crow_indices)
        got = to_dense(out, 0.0)
        assert got.shape == (n, 3)
        np.testing.assert_allclose(got[:, 0], full[1:], atol=1e-5)
        assert got[0, 1] == 0.0 and got[2, 1] < 0 and got[4, 2] < 0


def eventually(condition, timeout: float = 30.0) -> None:
    """Wait for `condition()` (GET /status is refreshed twice a second)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.05)


def running_samples(http) -> int:
    return http.get("/status").json()["sampling"]["running_requests"]


def cancelled_samples(http) -> int:
    return http.get("/status").json()["sampling"]["cancelled_requests"]


def test_abandoned_samples_are_cancelled_and_give_back_their_memory(http, sampler):
    """POST /cancel_future (SDK 0.38): the running request stops and frees its KV blocks, the
    one waiting for memory leaves the queue; both futures fail as cancelled."""
    body = long_samples(sampler)
    time.sleep(1.0)  # let earlier tests' requests drain
    used_before = http.get("/status").json()["sampling"]["kv_blocks_used"]  # cached prompts
    ids = [
        http.post("/asample", json={**body, "seq_id": 40_000 + i}).json()["request_id"]
        for i in range(2)
    ]
    eventually(lambda: running_samples(http) == 1)  # the first runs; the second waits
    for request_id in reversed(ids):  # the waiting one first, then the running one
        assert http.post("/cancel_future", json={"request_id": request_id}).status_code == 200
    for request_id in ids:
        r = await_future(http, request_id)
        assert "cancelled" in r.json()["error"], r.text
    eventually(lambda: running_samples(http) == 0)
    # the running one's blocks (2 x 1,907 positions) are back; the prompt may stay cached
    assert http.get("/status").json()["sampling"]["kv_blocks_used"] <= used_before + 1
    # cancelling what already ended, another kind of request, or nothing at all
    assert http.post("/cancel_future", json={"request_id": ids[0]}).status_code == 200
    assert http.post("/cancel_future", json={"request_id": "req-none"}).status_code == 404
    dynamic = http.post("/client/dynamic_config", json={"sdk_version": "0.38.0"}).json()
    assert dynamic["sample_cancel_enabled"] is True


def test_the_sdk_cancels_a_sample_whose_future_is_cancelled(http, sampler):
    params = types.SamplingParams(max_tokens=1900, temperature=1.0, stop=[])
    time.sleep(1.0)
    before = cancelled_samples(http)
    future = sampler.sample(types.ModelInput.from_ints(PROMPT), 2, params)
    eventually(lambda: running_samples(http) == 1)
    future.future().cancel()  # the SDK then POSTs /cancel_future for it
    eventually(lambda: running_samples(http) == 0)
    assert cancelled_samples(http) == before + 1  # stopped by the cancel, not run to its end


def test_inflight_samplers_follow_the_latest_published_weights(service):
    """SDK 0.38 kind="inflight": every inflight sampler of a model samples new requests from
    its latest inflight save; each has its own KV namespace; snapshots never change."""
    tc = service.create_lora_training_client(base_model=BASE, rank=4, seed=0).result()
    prompt = types.ModelInput.from_ints(PROMPT)
    greedy = types.SamplingParams(max_tokens=8, temperature=0.0, stop=[])

    def tokens(sampler) -> tuple[list[int], int]:
        out = sampler.sample(prompt, 1, greedy).result()
        return out.sequences[0].tokens, out.prompt_cache_hit_tokens or 0

    first = tc.save_weights_and_get_sampling_client(kind="inflight").result()
    frozen = tc.save_weights_and_get_sampling_client().result()
    before, _ = tokens(first)
    assert tokens(first)[1] > 0  # its own namespace reuses its cached prompt
    target = [5] * len(PROMPT)  # train towards another continuation
    datum = types.Datum(model_input=prompt, loss_fn_inputs={"target_tokens": target})
    for _ in range(8):
        tc.forward_backward([datum], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=0.1))
    second = tc.save_weights_and_get_sampling_client(kind="inflight").result()
    now_first, _ = tokens(first)  # the first sampler follows the new save
    now_second, hit = tokens(second)
    assert hit == 0  # a new session: nothing of the first one's KV, same prompt and weights
    assert now_first == now_second != before
    assert tokens(frozen)[0] == before  # a snapshot keeps its weights
