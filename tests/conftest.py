"""Shared fixtures: tiny model folders built locally and a live `lathe serve` subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
import tinker
import uvicorn

from lathe.api.app import create_app
from lathe.api.wire import tinker_wire_pb2 as pb
from lathe.client.choice import engine_spec
from lathe.client.in_process import InProcessEngine
from lathe.local_server import LOCAL_API_KEY, LocalServer, free_port
from lathe.settings import Settings
from lathe.testing.tiny_models import TinyModelSpec, make_tiny

API_KEY = LOCAL_API_KEY


def create_key(user: str, data_dir: Path) -> str:
    """A new API key for `user` in the data dir of a server run without --dev (`lathe keys`)."""
    r = subprocess.run(
        [sys.executable, "-m", "lathe", "keys", "create", user],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LATHE_HOME": str(data_dir)},
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


os.environ.setdefault("TINKER_TELEMETRY", "0")
# A PostgreSQL server the tests may create databases on (.ci/run starts one); the PostgreSQL
# cases are skipped without it.
POSTGRES = os.environ.get("LATHE_TEST_DATABASE_URL")
needs_postgres = pytest.mark.skipif(not POSTGRES, reason="LATHE_TEST_DATABASE_URL is not set")


@pytest.fixture
def postgres_url():
    """A fresh PostgreSQL database for one test, dropped after it."""
    assert POSTGRES is not None
    name = f"lathe_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.make_url(POSTGRES).set(database=name).render_as_string(hide_password=False)
    yield url
    sa.create_engine(url).dispose()
    with admin.connect() as c:
        c.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-qwen3", TinyModelSpec())


@pytest.fixture(scope="module")
def server(tiny_qwen3, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    with LocalServer({"tiny-qwen3": tiny_qwen3}, data_dir, "--long-poll-seconds", "5") as srv:
        yield srv


class InProcessServer:
    """`create_app` served by uvicorn on a thread of this process.

    The SDK still talks to it over HTTP on 127.0.0.1; the test can also look inside the
    engine (adapter tensors and their gradients) to compare them with a reference.
    """

    def __init__(self, settings: Settings) -> None:
        self.engine = InProcessEngine(engine_spec(settings))
        self.app = create_app(settings, self.engine)
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    @property
    def runner(self):
        return self.engine.engine.runner

    def adapter(self, model_id: str):
        return self.runner.models[model_id].adapter

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def http(server):
    """Raw HTTP to the server's API, authenticated like the SDK."""
    with httpx.Client(
        base_url=f"{server.base_url}/api/v1", headers={"X-API-Key": API_KEY}, timeout=30
    ) as client:
        yield client


@pytest.fixture(scope="module")
def service(server):
    """An SDK ServiceClient on the module's server."""
    with tinker.ServiceClient(base_url=server.base_url, api_key=API_KEY) as sc:
        yield sc


def await_future(
    http: httpx.Client, request_id: str, allow: tuple[int, ...] = ()
) -> httpx.Response:
    """Poll /retrieve_future until the answer is no longer `try_again` (or has a status in
    `allow` besides 200)."""
    while True:
        r = http.post("/retrieve_future", json={"request_id": request_id})
        if r.status_code in allow:
            return r
        assert r.status_code == 200, r.text
        if "protobuf" in r.headers["content-type"] or r.json().get("type") != "try_again":
            return r


def new_session_and_model(http: httpx.Client, base_model: str) -> tuple[str, str]:
    """Over raw HTTP: a session and a rank-4 model in it, created; (session_id, model_id)."""
    sid = http.post("/create_session", json={}).json()["session_id"]
    r = http.post(
        "/create_model",
        json={
            "session_id": sid,
            "model_seq_id": 0,
            "base_model": base_model,
            "lora_config": {"rank": 4},
        },
    )
    await_future(http, r.json()["request_id"])
    return sid, r.json()["model_id"]


def fwdbwd_body(
    model_id: str, seq_id: int, tokens: list[int], targets: list[int], forward_only: bool = False
) -> bytes:
    """A serialized cross-entropy ForwardBackwardRequest with one datum."""
    req = pb.ForwardBackwardRequest(
        model_id=model_id, seq_id=seq_id, loss_fn="cross_entropy", forward_only=forward_only
    )
    d = req.data.add()
    d.model_input.add().encoded_text.tokens = np.asarray(tokens, dtype="<i4").tobytes()
    d.loss_fn_inputs["target_tokens"].CopyFrom(
        pb.Tensor(
            dense=np.asarray(targets, dtype="<i8").tobytes(),
            dtype=pb.DTYPE_INT64,
            shape=[len(targets)],
        )
    )
    return req.SerializeToString()


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory) -> Path:
    """A tiny random Qwen3 saved by transformers itself, for reference comparisons."""
    from reference import save_hf_qwen3

    return save_hf_qwen3(tmp_path_factory.mktemp("hf-qwen3"))


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where torch sees a CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
