"""Shared fixtures: tiny model folders built locally and a live `lathe serve` subprocess."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
