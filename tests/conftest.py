"""Shared fixtures: tiny model folders built locally and a live `lathe serve` subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lathe.models.tiny import TinyModelSpec, make_tiny

API_KEY = "tml-test-key"


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-qwen3", TinyModelSpec())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`lathe serve` in a subprocess on 127.0.0.1, as a user would start it."""

    def __init__(self, models: dict[str, Path], data_dir: Path, *extra: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        args = [
            sys.executable,
            "-m",
            "lathe",
            "serve",
            "--port",
            str(self.port),
            "--data-dir",
            str(data_dir),
            "--long-poll-seconds",
            "5",
            *extra,
        ]
        for name, path in models.items():
            args += ["--model", f"{name}={path}"]
        self.log_path = data_dir.parent / f"server-{self.port}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "TINKER_TELEMETRY": "0"}
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.wait_ready()

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log_path.read_text()}")
            try:
                r = httpx.get(f"{self.base_url}/api/v1/healthz", headers={"X-API-Key": API_KEY})
                if r.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server did not start:\n{self.log_path.read_text()}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def server(tiny_qwen3, tmp_path_factory):
    srv = LiveServer({"tiny-qwen3": tiny_qwen3}, tmp_path_factory.mktemp("data"))
    yield srv
    srv.stop()
