"""SDK 0.38's session-wide sampling: /retrieve_futures (one poller per sampling session and
client copy, instead of a long poll per sample) and /join_sampling_session (copies of a
SamplingClient get their own seq-id ranges), which the client config switches on."""

from __future__ import annotations

import concurrent.futures
import pickle

import pytest
from tinker import types

from lathe.local_server import LocalServer

from conftest import await_future

BASE = "tiny-qwen3"
PROMPT = types.ModelInput.from_ints([11, 42, 7, 99, 250, 3, 17])
FLAGS = {"sample_use_retrieve_futures": True, "sample_join_sampling_session": True}


@pytest.fixture(scope="module")
def server(tiny_qwen3, tmp_path_factory):
    args = ("--long-poll-seconds", "3")  # FLAGS are the server's defaults
    with LocalServer({BASE: tiny_qwen3}, tmp_path_factory.mktemp("data"), *args) as srv:
        yield srv


def test_samples_complete_through_the_session_poller_and_clones_join(service, http):
    assert {k: v for k, v in http.post("/client/config", json={}).json().items() if k in FLAGS} == (
        FLAGS
    )
    sampler = service.create_sampling_client(base_model=BASE).result()
    params = types.SamplingParams(max_tokens=6, temperature=1.0)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(
                lambda seed: sampler.sample(
                    PROMPT, 2, types.SamplingParams(**{**params.model_dump(), "seed": seed})
                ).result(timeout=120),
                range(16),
            )
        )
    assert all(len(r.sequences) == 2 for r in results)
    greedy = types.SamplingParams(max_tokens=6, temperature=0.0)
    expected = sampler.sample(PROMPT, 1, greedy).result().sequences[0].tokens
    # a copy (as another process would unpickle it) joins the session: its own seq ids
    copy = pickle.loads(pickle.dumps(sampler))
    assert copy.sample(PROMPT, 1, greedy).result(timeout=120).sequences[0].tokens == expected
    sid = sampler._sampling_session_id
    joined = http.post("/join_sampling_session", json={"sampling_session_id": sid})
    assert joined.json()["client_counter"] >= 2  # the copy was 1


def test_the_poller_sees_completions_in_order_and_forgets_acknowledged_ones(service, http):
    sampler = service.create_sampling_client(base_model=BASE).result()
    sid = sampler._sampling_session_id
    target = {"type": "sampling_session", "sampling_session_id": sid, "cloned_sampler_id": 0}
    poll = {"target": target, "prev_cursor": 0, "timeout": 0, "retrieved_request_ids": []}
    assert http.post("/retrieve_futures", json=poll).json() == {"completions": [], "cursor": 0}
    body = {
        "sampling_session_id": sid,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 6, 7]}]},
        "sampling_params": {"max_tokens": 3},
        "num_samples": 1,
    }
    ids = [http.post("/asample", json={**body, "seq_id": i}).json()["request_id"] for i in range(3)]
    seen: list[str] = []
    cursor = 0
    while len(seen) < 3:  # long polls (timeout omitted) answer as soon as something finished
        answer = http.post(
            "/retrieve_futures", json={**poll, "prev_cursor": cursor, "timeout": None}
        )
        assert answer.status_code == 200, answer.text
        got = answer.json()
        assert got["cursor"] >= cursor
        seen += [c["request_id"] for c in got["completions"] if c["state"] == "finished"]
        cursor = got["cursor"]
    assert sorted(seen) == sorted(ids)
    assert "protobuf" in await_future(http, ids[0]).headers["content-type"]
    # acknowledged (at or before the cursor): gone; a copy's target sees nothing of these
    again = http.post("/retrieve_futures", json={**poll, "prev_cursor": cursor}).json()
    assert again == {"completions": [], "cursor": cursor}
    stale = http.post("/retrieve_futures", json={**poll, "prev_cursor": 0}).json()
    assert stale["completions"] == []
    clone = {**poll, "target": {**target, "cloned_sampler_id": 1}}
    assert http.post("/retrieve_futures", json=clone).json()["completions"] == []


def test_the_poller_refuses_unknown_sessions_and_bad_bodies(http):
    target = {"type": "sampling_session", "sampling_session_id": "nope:sample:0"}
    r = http.post("/retrieve_futures", json={"target": target, "timeout": 0})
    assert r.status_code == 404 and "detail" in r.json()
    r = http.post("/retrieve_futures", json={"target": {**target, "cloned_sampler_id": -1}})
    assert r.status_code == 400
    r = http.post("/join_sampling_session", json={"sampling_session_id": "nope:sample:0"})
    assert r.status_code == 404
