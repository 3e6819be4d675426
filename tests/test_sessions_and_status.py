"""Session expiry and the status endpoint, against a live server with a short timeout."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest
import tinker
from tinker import types

from lathe.local_server import LocalServer

from conftest import API_KEY, await_future, fwdbwd_body, new_session_and_model

BASE = "tiny-qwen3"


@pytest.fixture(scope="module")
def srv(tiny_qwen3, tmp_path_factory):
    args = (
        "--long-poll-seconds",
        "2",
        "--session-timeout",
        "12",  # above the SDK's 10 s heartbeat interval
        "--reap-seconds",
        "0.5",
        "--max-resident-adapters",
        "2",
    )
    with LocalServer({BASE: tiny_qwen3}, tmp_path_factory.mktemp("data"), *args) as server:
        yield server


def test_a_silent_session_expires_and_its_checkpoints_stay(srv):
    with httpx.Client(
        base_url=f"{srv.base_url}/api/v1", headers={"X-API-Key": API_KEY}, timeout=30
    ) as http:
        sid, model = new_session_and_model(http, BASE)
        save = http.post(
            "/save_weights", json={"model_id": model, "seq_id": 1, "path": "kept"}
        ).json()
        await_future(http, save["request_id"])
        time.sleep(13.5)  # no heartbeats: the session ends after 12 s
        r = http.post(
            "/forward_backward",
            content=fwdbwd_body(model, 2, [1, 2], [2, 3]),
            headers={"Content-Type": "application/x-protobuf"},
        )
        assert r.status_code == 400 and "has ended" in r.json()["detail"]
        assert http.post("/session_heartbeat", json={"session_id": sid}).status_code == 410
        status = http.get("/status").json()
        assert status["training"]["adapters"] == 0  # unloaded
        found = http.post("/sessions/search", json={"session_id": sid}).json()["sessions"]
        assert found[0]["status"]["type"] == "cancelled"  # it ended without its client
    with tinker.ServiceClient(base_url=srv.base_url, api_key=API_KEY) as sc:
        tc = sc.create_training_client_from_state(f"tinker://{model}/weights/kept").result()
        datum = types.Datum(
            model_input=types.ModelInput.from_ints([1, 2, 3]),
            loss_fn_inputs={"target_tokens": [2, 3, 4]},
        )
        assert tc.forward([datum], "cross_entropy").result().metrics["loss:sum"] > 0


def test_search_sessions_by_name_metadata_status_and_page(srv):
    """RestClient.search_sessions (SDK 0.38): newest first, filters, a cursor for pages."""
    for i, name in enumerate(["alpha run", "beta run", "Alpha eval"]):
        meta = {"exp": str(i % 2)}
        with tinker.ServiceClient(
            meta, display_name=name, base_url=srv.base_url, api_key=API_KEY
        ) as sc:
            sc.create_sampling_client(base_model=BASE).result()
    rest = tinker.RestClient(base_url=srv.base_url, api_key=API_KEY)

    def find(**kw) -> types.SessionSearchResponse:
        return rest.search_sessions(types.SessionSearchRequest(**kw)).result()

    alphas = find(display_name="ALPHA")
    assert [x.display_name for x in alphas.sessions] == ["Alpha eval", "alpha run"]
    assert find(display_name="run alpha").sessions[0].display_name == "alpha run"  # every word
    assert [x.display_name for x in find(user_metadata={"exp": "1"}).sessions] == ["beta run"]
    done = find(statuses=[types.ClientFinishedSessionStatusQuery(reasons=["success"])])
    assert {"alpha run", "beta run", "Alpha eval"} <= {x.display_name for x in done.sessions}
    assert all(x.status.type == "client_finished" for x in done.sessions)
    assert all(x.status.type == "active" for x in find(statuses=[{"type": "active"}]).sessions)
    first = find(display_name="alpha", limit=1)
    assert first.next_cursor is not None and len(first.sessions) == 1
    second = find(display_name="alpha", limit=1, cursor=first.next_cursor)
    assert [x.display_name for x in first.sessions + second.sessions] == [
        "Alpha eval",
        "alpha run",
    ]
    assert second.next_cursor is None
    someone = types.UserSearchOwner(owner_urns=["someone-else"])
    assert find(owner=someone).sessions == []  # other users' sessions are never listed
    one = alphas.sessions[0]
    assert find(session_id=one.session_id).sessions[0].session_id == one.session_id
    assert one.checkpoints_count == 0 and one.owner


def test_status_shows_models_queues_and_throughput(srv):
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(list(range(1, 30))),
        loss_fn_inputs={"target_tokens": list(range(2, 31))},
    )
    with tinker.ServiceClient(base_url=srv.base_url, api_key=API_KEY) as sc:
        clients = [
            sc.create_lora_training_client(base_model=BASE, rank=4).result() for _ in range(3)
        ]
        for tc in clients:
            tc.forward_backward([datum], "cross_entropy").result()
        sampler = clients[0].save_weights_and_get_sampling_client().result()
        sampler.sample(
            types.ModelInput.from_ints([1, 2]), 2, types.SamplingParams(max_tokens=8)
        ).result()
        # The engine publishes its status twice a second: allow it a few publishes to catch up
        # with everything above (the sample last).
        deadline = time.monotonic() + 10
        while True:
            r = subprocess.run(
                [sys.executable, "-m", "lathe", "status", "--url", srv.base_url]
                + ["--api-key", API_KEY],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert r.returncode == 0, r.stderr
            status = json.loads(r.stdout)
            caught_up = status["training"]["adapters"] == 3
            caught_up &= status["tokens_per_second"]["sampling"] > 0  # the last work done
            if caught_up or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert status["you"] == "local" and status["base_models"] == [BASE]
        training = status["training"]
        assert training["adapters"] == 3 and training["resident"] <= 2, status  # the budget holds
        assert training["swapped_to_disk"] == training["adapters"] - training["resident"]
        assert status["tokens_per_second"]["training"] > 0
        assert status["tokens_per_second"]["sampling"] > 0
        assert status["memory"]["rss_bytes"] > 10**6
        assert "kv_blocks_total" in status["sampling"]
        time.sleep(13)  # heartbeats keep the session alive beyond the timeout
        assert clients[2].forward([datum], "cross_entropy").result().metrics["loss:sum"] > 0


def train_six_in_turn(base_url: str) -> list[list[float]]:
    """Six adapters, one step each in turn, three rounds; every adapter's losses."""
    data = [
        [
            types.Datum(
                model_input=types.ModelInput.from_ints([(i * 7 + j) % 97 + 1 for j in range(20)]),
                loss_fn_inputs={"target_tokens": [(i * 7 + j) % 97 + 2 for j in range(20)]},
            )
        ]
        for i in range(6)
    ]
    adam = types.AdamParams(learning_rate=0.01)
    with tinker.ServiceClient(base_url=base_url, api_key=API_KEY) as sc:
        clients = [
            sc.create_lora_training_client(base_model=BASE, rank=4, seed=i).result()
            for i in range(6)
        ]
        losses: list[list[float]] = [[] for _ in range(6)]
        for _ in range(3):
            for i, tc in enumerate(clients):
                out = tc.forward_backward(data[i], "cross_entropy").result()
                tc.optim_step(adam).result()
                losses[i].append(out.metrics["loss:sum"])
    return losses


def test_six_adapters_with_room_for_two_train_as_if_all_were_resident(srv, server):
    bounded = train_six_in_turn(srv.base_url)  # --max-resident-adapters 2
    assert bounded == train_six_in_turn(server.base_url)  # unbounded: bit for bit the same
    for losses in bounded:  # and they do train: each continues where it left off
        assert losses[2] < losses[1] < losses[0]
    with httpx.Client(base_url=f"{srv.base_url}/api/v1", headers={"X-API-Key": API_KEY}) as http:
        assert http.get("/status").json()["training"]["resident"] <= 2
