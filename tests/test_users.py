"""Users, keys and ownership against a server with real keys (no --dev)."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from lathe.local_server import LocalServer

from conftest import await_future, fwdbwd_body

BASE = "tiny-qwen3"


def lathe(*args: str, data_dir) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "lathe",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LATHE_HOME": str(data_dir)},
    )


@pytest.fixture(scope="module")
def keyed(tiny_qwen3, tmp_path_factory):
    """A server with users alice (two keys) and bob; yields (server, alice, alice2, bob)."""
    data = tmp_path_factory.mktemp("data")
    keys = {}
    for label, user in (("alice", "alice"), ("alice2", "alice"), ("bob", "bob")):
        r = lathe("keys", "create", user, data_dir=data)
        assert r.returncode == 0, r.stderr
        keys[label] = r.stdout.strip()
        assert keys[label].startswith("tml-")
    args = (
        "--long-poll-seconds",
        "2",
        "--jwt",
        "--limit",
        "max_tokens_per_request=300",
        "--limit",
        "max_body_bytes=200000",
        "--limit",
        "max_queued_requests=6",
    )
    with LocalServer({BASE: tiny_qwen3}, data, *args, dev=False) as srv:
        yield srv, keys, data


def client(srv, key):
    return httpx.Client(base_url=f"{srv.base_url}/api/v1", headers={"X-API-Key": key}, timeout=30)


def datum(n=6):
    return types.Datum(
        model_input=types.ModelInput.from_ints(list(range(1, n + 1))),
        loss_fn_inputs={"target_tokens": list(range(2, n + 2))},
    )


def test_keys_are_stored_hashed_and_listed_without_secrets(keyed):
    srv, keys, data = keyed
    db = (data / "lathe.db").read_bytes()
    assert all(k.encode() not in db for k in keys.values())
    listing = lathe("keys", "list", data_dir=data).stdout
    assert "alice" in listing and "bob" in listing
    assert all(k not in listing for k in keys.values())


def test_unknown_keys_get_401_with_a_detail(keyed):
    srv, _, _ = keyed
    r = client(srv, "tml-not-a-real-key").get("/get_server_capabilities")
    assert r.status_code == 401 and "unknown or revoked" in r.json()["detail"]


def test_another_users_resources_are_404_everywhere(keyed):
    srv, keys, _ = keyed
    with tinker.ServiceClient(base_url=srv.base_url, api_key=keys["alice"]) as alice:
        tc = alice.create_lora_training_client(base_model=BASE, rank=4).result()
        tc.forward_backward([datum()], "cross_entropy").result()
        state = tc.save_state("a-state").result().path
        sampler_path = tc.save_weights_for_sampler("a-sampler").result().path
        sampler = tc.save_weights_and_get_sampling_client().result()
        export = tc.save_weights_external("e1").result().path
        future = (
            client(srv, keys["alice"])
            .post("/optim_step", json={"model_id": tc.model_id, "seq_id": 6})
            .json()["request_id"]
        )
        sid = tc.model_id.split(":")[0]

        with client(srv, keys["bob"]) as bob:
            kind, name = "weights", "a-state"
            probes = [
                bob.get(f"/training_runs/{tc.model_id}/checkpoints"),
                bob.post("/get_info", json={"model_id": tc.model_id}),
                bob.post("/weights_info", json={"tinker_path": state}),
                bob.get(f"/samplers/{sampler._sampling_session_id}"),
                bob.post(
                    "/asample",
                    json={
                        "sampling_session_id": sampler._sampling_session_id,
                        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
                        "sampling_params": {"max_tokens": 1},
                    },
                ),
                bob.post("/optim_step", json={"model_id": tc.model_id, "seq_id": 9}),
                bob.post("/retrieve_future", json={"request_id": future}),
                bob.post("/session_heartbeat", json={"session_id": sid}),
                bob.post(
                    "/create_model", json={"session_id": sid, "model_seq_id": 5, "base_model": BASE}
                ),
                bob.delete(f"/training_runs/{tc.model_id}/checkpoints/{kind}/{name}"),
                bob.get(f"/training_runs/{tc.model_id}/checkpoints/{kind}/{name}/archive"),
                bob.get(
                    f"/training_runs/{tc.model_id}/checkpoints/external_weights/e1"
                    "/external_weights_urls"
                ),
                bob.put(
                    f"/training_runs/{tc.model_id}/checkpoints/{kind}/{name}/ttl",
                    json={"ttl_seconds": 5},
                ),
                bob.post("/copy_weights", json={"source_path": state}),
                bob.get(f"/training_runs/{tc.model_id}"),
                bob.get(f"/sessions/{sid}"),
                bob.post(f"/training_runs/{tc.model_id}/checkpoints/{kind}/{name}/publish"),
            ]
            for r in probes:
                assert r.status_code == 404, (r.request.url, r.text)
                assert "not found" in r.json()["detail"]
            # alice's own second key sees everything: keys belong to the user
            with client(srv, keys["alice2"]) as alice2:
                assert alice2.post("/weights_info", json={"tinker_path": state}).status_code == 200
                urls = alice2.get(
                    f"/training_runs/{tc.model_id}/checkpoints/external_weights/"
                    "e1/external_weights_urls"
                ).json()["urls"]
            # a signed URL is the key to one file: it cannot be bent to reach another
            url = urls["adapter_config.json"]
            assert httpx.get(url).status_code == 200  # no API key needed
            forged = url.replace("adapter_config.json", "adapter_model.safetensors")
            assert httpx.get(forged).status_code == 403
            assert export.endswith("/external_weights/e1")

        with tinker.ServiceClient(base_url=srv.base_url, api_key=keys["bob"]) as bob_sdk:
            with pytest.raises(tinker.NotFoundError):
                bob_sdk.create_training_client_from_state(state).result()
            with pytest.raises(tinker.NotFoundError):
                bob_sdk.create_sampling_client(model_path=sampler_path).result()
            # published: bob may read and load it, never change or delete it
            rest = tinker.RestClient(base_url=srv.base_url, api_key=keys["alice"])
            rest.publish_checkpoint_from_tinker_path(state).result()
            bob_rest = tinker.RestClient(base_url=srv.base_url, api_key=keys["bob"])
            assert bob_rest.get_weights_info_by_tinker_path(state).result().lora_rank == 4
            loaded = bob_sdk.create_training_client_from_state(state).result()
            assert loaded.forward([datum()], "cross_entropy").result().metrics["loss:sum"] > 0
            with pytest.raises(tinker.NotFoundError):
                bob_rest.delete_checkpoint_from_tinker_path(state).result()
            with pytest.raises(tinker.NotFoundError):
                bob_rest.unpublish_checkpoint_from_tinker_path(state).result()
            rest.unpublish_checkpoint_from_tinker_path(state).result()
            with pytest.raises(tinker.NotFoundError):
                bob_rest.get_weights_info_by_tinker_path(state).result()


def test_revoked_keys_stop_working_at_once(keyed):
    srv, _, data = keyed
    key = lathe("keys", "create", "carol", data_dir=data).stdout.strip()
    with client(srv, key) as carol:
        assert carol.get("/get_server_capabilities").status_code == 200
        r = lathe("keys", "revoke", "carol", data_dir=data)
        assert r.returncode == 0 and "revoked 1" in r.stdout
        assert carol.get("/get_server_capabilities").status_code == 401
    assert lathe("keys", "revoke", "nobody", data_dir=data).returncode == 2


def test_limits_are_enforced_and_named(keyed):
    srv, keys, _ = keyed
    with tinker.ServiceClient(base_url=srv.base_url, api_key=keys["bob"]) as sc:
        tc = sc.create_lora_training_client(base_model=BASE, rank=4).result()
        with pytest.raises(tinker.BadRequestError, match="max_tokens_per_request"):
            tc.forward_backward([datum(200), datum(200)], "cross_entropy").result()
        assert tc.forward([datum()], "cross_entropy").result().metrics["loss:sum"] > 0
        with client(srv, keys["bob"]) as bob:
            r = bob.post(
                "/create_session",
                content=b"x" * 300_000,
                headers={"Content-Type": "application/json"},
            )
            assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]
            # requests ahead of a seq id that never comes stay unfinished: they fill the queue
            ahead = [
                bob.post(
                    "/forward_backward",
                    content=fwdbwd_body(tc.model_id, 1000 + i, [1, 2, 3], [2, 3, 4], True),
                    headers={"Content-Type": "application/x-protobuf"},
                )
                for i in range(8)
            ]
            assert [r.status_code for r in ahead] == [200] * 6 + [429] * 2
            assert "max_queued_requests" in ahead[6].json()["detail"]
            assert ahead[6].headers["retry-after"] == "1"
    # the SDK ended its session on exit: the waiting requests fail and free bob's queue
    with client(srv, keys["bob"]) as bob:
        r = await_future(bob, ahead[0].json()["request_id"]).json()
        assert "unloaded" in r["error"], r
    with tinker.ServiceClient(base_url=srv.base_url, api_key=keys["bob"]) as sc:
        sampler = sc.create_sampling_client(base_model=BASE).result()
        params = types.SamplingParams(max_tokens=2)
        assert sampler.sample(types.ModelInput.from_ints([1, 2]), 1, params).result().sequences


def test_nan_advantages_never_reach_the_adapter(keyed):
    srv, keys, _ = keyed
    with tinker.ServiceClient(base_url=srv.base_url, api_key=keys["bob"]) as sc:
        tc = sc.create_lora_training_client(base_model=BASE, rank=4, seed=1).result()
        d = types.Datum(
            model_input=types.ModelInput.from_ints([1, 2, 3, 4]),
            loss_fn_inputs={
                "target_tokens": [2, 3, 4, 5],
                "logprobs": [-1.0] * 4,
                "advantages": [1.0, float("nan"), 0.5, 1.0],
            },
        )
        before = tc.forward([datum()], "cross_entropy").result().metrics["loss:sum"]
        with pytest.raises(tinker.BadRequestError, match="NaN"):
            tc.forward_backward([d], "importance_sampling").result()
        tc.optim_step(types.AdamParams(learning_rate=0.5)).result()
        after = tc.forward([datum()], "cross_entropy").result().metrics["loss:sum"]
        assert after == before and not np.isnan(after)


def test_jwt_mode_whoami_through_the_sdk_cli(keyed):
    srv, keys, _ = keyed
    env = {**os.environ, "TINKER_BASE_URL": srv.base_url, "TINKER_API_KEY": keys["alice"]}
    tinker_cli = [sys.executable, "-c", "from tinker.cli.__main__ import cli; cli()"]
    r = subprocess.run(
        [*tinker_cli, "auth", "whoami"], capture_output=True, text=True, env=env, timeout=60
    )
    assert r.returncode == 0, r.stderr + r.stdout
    assert "lathe:user:alice" in r.stdout
    r = subprocess.run(
        [*tinker_cli, "-f", "json", "auth", "whoami"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert "lathe:user:alice" in r.stdout


def test_serve_refuses_unsafe_setups(tmp_path):
    r = lathe("serve", "--host", "0.0.0.0", data_dir=tmp_path)
    assert r.returncode == 2 and "no API keys" in r.stderr
    r = lathe("serve", "--dev", "--host", "0.0.0.0", data_dir=tmp_path)
    assert r.returncode == 2 and "loopback" in r.stderr
