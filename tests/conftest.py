"""Shared fixtures: tiny model folders built locally and a live `lathe serve` subprocess."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import numpy as np
import pytest

from lathe.api.wire import tinker_wire_pb2 as pb
from lathe.local_server import LOCAL_API_KEY, LocalServer
from lathe.models.tiny import TinyModelSpec, make_tiny

API_KEY = LOCAL_API_KEY
os.environ.setdefault("TINKER_TELEMETRY", "0")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-qwen3", TinyModelSpec())


@pytest.fixture(scope="module")
def server(tiny_qwen3, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    with LocalServer({"tiny-qwen3": tiny_qwen3}, data_dir, "--long-poll-seconds", "5") as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    """Raw HTTP to the server's API, authenticated like the SDK."""
    with httpx.Client(
        base_url=f"{server.base_url}/api/v1", headers={"X-API-Key": API_KEY}, timeout=30
    ) as client:
        yield client


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
