"""Two API replicas on one database and one shared engine service (`lathe engine --listen`).

A future lives in the database with the replica that submitted its work; the other replica
answers for it too: it waits while the owner is alive and pending, and reports it lost once
the owner has stopped. Live: SDK training through replica A; retrieve_future, listings and a
checkpoint download through replica B (on SQLite, and on PostgreSQL where
LATHE_TEST_DATABASE_URL is set, as .ci/run does).
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import tarfile
import time

import httpx
import numpy as np
import pytest

from lathe.api.futures import FutureRegistry
from lathe.api.wire import tinker_wire_pb2 as pb
from lathe.local_server import LOCAL_API_KEY, LocalEngine, LocalServer, free_port
from lathe.protocol import messages as m
from lathe.store.db import Store, UserRow

from conftest import await_future, fwdbwd_body, needs_postgres, new_session_and_model

PROTO = {"Content-Type": "application/x-protobuf"}


def test_a_future_is_answered_by_every_replica_and_lost_only_with_its_owner(tmp_path):
    url = f"sqlite:///{tmp_path / 'lathe.db'}"
    store = Store(url)
    store.add(UserRow(name="alice"))
    a, b = FutureRegistry(Store(url)), FutureRegistry(Store(url))
    a.beat()
    b.beat()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        a.bind_loop(loop)
        finisher = lambda result: ("application/json", b'{"ok": true}')  # noqa: E731
        rid, _ = a.create("forward_backward", None, finisher, owner_id=1)
        held = await b.wait(rid, 0.3, owner_id=1)  # pending on A: B waits, does not fail it
        assert held is not None and held.status == "pending" and held.held_elsewhere
        waiting = asyncio.create_task(b.wait(rid, 10.0, owner_id=1))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(a.complete, m.Done(rid, result=m.Empty()))
        done = await waiting  # B sees A's result as soon as A has written it
        assert (done.status, done.payload) == ("done", b'{"ok": true}')
        assert await b.wait(rid, 0.1, owner_id=2) is None  # another user's future is unknown

        orphan, _ = a.create("sample", None, finisher, owner_id=1)
        a.store.forget_replica(a.replica_id)  # A stopped before finishing it
        lost = await b.wait(orphan, 0.3, owner_id=1)
        assert lost is not None and (lost.status, lost.category) == ("failed", "server")

    asyncio.run(scenario())


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=needs_postgres)])
def shared_database(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.mark.slow
def test_two_replicas_share_one_engine_and_one_database(tiny_qwen3, tmp_path, shared_database):
    import openai
    import tinker
    from tinker import types

    models = {"tiny-qwen3": tiny_qwen3}
    engine = LocalEngine(models, tmp_path)
    shared = ("--engine", engine.address, "--database-url", shared_database)
    try:
        with (
            LocalServer(models, tmp_path, *shared) as replica_a,
            LocalServer(models, tmp_path, *shared) as replica_b,
        ):
            http_a, http_b = (
                httpx.Client(
                    base_url=f"{r.base_url}/api/v1", headers={"X-API-Key": "tml-x"}, timeout=60
                )
                for r in (replica_a, replica_b)
            )
            status_b = http_b.get("/status").json()["engine"]
            assert (status_b["mode"], status_b["state"]) == ("shared", "running")
            assert status_b["service"]["replicas"] >= 1

            # SDK training through replica A
            tokens = np.random.default_rng(0).integers(3, 400, 17).tolist()
            datum = types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:]},
            )
            with tinker.ServiceClient(base_url=replica_a.base_url, api_key=LOCAL_API_KEY) as sc:
                tc = sc.create_lora_training_client(
                    base_model="tiny-qwen3", rank=4, seed=0
                ).result()
                first = tc.forward_backward([datum], "cross_entropy").result()
                tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
                second = tc.forward_backward([datum], "cross_entropy").result()
                assert second.metrics["loss:sum"] < first.metrics["loss:sum"]
                path = tc.save_state("shared").result().path
                sampler_path = tc.save_weights_for_sampler("shared-sampler").result().path

            # A's checkpoint sampled through B
            with tinker.ServiceClient(base_url=replica_b.base_url, api_key=LOCAL_API_KEY) as sc:
                sampler = sc.create_sampling_client(model_path=sampler_path).result()
                sampled = sampler.sample(
                    types.ModelInput.from_ints(tokens[:5]),
                    1,
                    types.SamplingParams(max_tokens=4, temperature=0.0),
                ).result()
                assert len(sampled.sequences[0].tokens) == 4

            # ... and streamed through B's OpenAI-compatible endpoint: progress reports of the
            # shared engine come back to the replica that asked
            oai = openai.OpenAI(base_url=f"{replica_b.base_url}/v1", api_key=LOCAL_API_KEY)
            args = {"model": sampler_path, "prompt": tokens[:5], "max_tokens": 6}
            whole = oai.completions.create(**args, temperature=0.0).choices[0]
            chunks = list(oai.completions.create(**args, temperature=0.0, stream=True))
            assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
            assert chunks[-1].choices[0].finish_reason == whole.finish_reason

            # a future submitted through A is retrieved through B, with A's result
            _, model_id = new_session_and_model(http_a, "tiny-qwen3")
            body = fwdbwd_body(model_id, 1, tokens[:-1], tokens[1:], forward_only=True)
            rid = http_a.post("/forward_backward", content=body, headers=PROTO).json()["request_id"]
            via_b = await_future(http_b, rid)
            via_a = await_future(http_a, rid)
            assert via_b.content == via_a.content
            loss = pb.ForwardBackwardOutput.FromString(via_b.content).metrics["loss:sum"]
            assert loss > 0

            # listings and the checkpoint download through B
            rest = tinker.RestClient(base_url=replica_b.base_url, api_key=LOCAL_API_KEY)
            runs = rest.list_training_runs().result().training_runs
            assert tc.model_id in {run.training_run_id for run in runs}
            listed = [
                c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints
            ]
            assert path in listed
            archive = http_b.get(f"/training_runs/{tc.model_id}/checkpoints/weights/shared/archive")
            assert archive.status_code == 200, archive.text
            tar = httpx.get(archive.json()["url"], timeout=60)
            assert tar.status_code == 200
            names = tarfile.open(fileobj=io.BytesIO(tar.content)).getnames()
            assert "adapter_model.safetensors" in names

            # training continues through B on the model A created: the engine orders seq ids
            again = fwdbwd_body(model_id, 2, tokens[:-1], tokens[1:], forward_only=True)
            rid_b = http_b.post("/forward_backward", content=again, headers=PROTO)
            assert rid_b.status_code == 200, rid_b.text
            same = await_future(http_a, rid_b.json()["request_id"])
            loss_b = pb.ForwardBackwardOutput.FromString(same.content).metrics["loss:sum"]
            assert loss_b == pytest.approx(loss, rel=1e-6)

            # the service freezes: B fails what it has in flight retryably and says so; once
            # the service is back, B goes on by itself
            os.kill(engine.proc.pid, signal.SIGSTOP)
            try:
                third = fwdbwd_body(model_id, 3, tokens[:-1], tokens[1:], forward_only=True)
                rid_3 = http_b.post("/forward_backward", content=third, headers=PROTO)
                lost = await_future(http_b, rid_3.json()["request_id"], allow=(410,))
                assert lost.status_code == 410 and "retry" in lost.json()["detail"]
                assert http_b.get("/status").json()["engine"]["state"] == "unreachable"
            finally:
                os.kill(engine.proc.pid, signal.SIGCONT)
            deadline = time.monotonic() + 30
            while http_b.get("/status").json()["engine"]["state"] != "running":
                assert time.monotonic() < deadline, "replica B never saw the service again"
                time.sleep(0.2)
            fourth = fwdbwd_body(model_id, 4, tokens[:-1], tokens[1:], forward_only=True)
            rid_4 = http_b.post("/forward_backward", content=fourth, headers=PROTO)
            back = await_future(http_b, rid_4.json()["request_id"])
            assert pb.ForwardBackwardOutput.FromString(back.content).metrics["loss:sum"] > 0
            http_a.close()
            http_b.close()
    finally:
        code = engine.stop()
    assert code == 0, engine.log_path.read_text()  # stopped cleanly, engine process and all


def test_a_replica_refuses_to_start_without_its_engine_service(tiny_qwen3, tmp_path, monkeypatch):
    """No service at the address: a clear error, not a hang (READY_TIMEOUT_S shortened)."""
    from lathe.client import remote
    from lathe.client.own_process import EngineStartError

    monkeypatch.setattr(remote, "READY_TIMEOUT_S", 1.0)
    client = remote.RemoteEngine(f"tcp://127.0.0.1:{free_port()}", b"s" * 32, ["tiny-qwen3"])
    started = time.monotonic()
    with pytest.raises(EngineStartError, match="lathe engine --listen"):
        client.start(lambda done: None)
    assert time.monotonic() - started < 10
