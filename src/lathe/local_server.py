"""Run `lathe serve` (and `lathe engine`) as child processes on free loopback ports (demo,
tests, benchmarks)."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

LOCAL_API_KEY = "tml-local"


def free_port() -> int:
    """A free loopback port below Linux's ephemeral range (32768+), where the ports the
    kernel hands out meanwhile (to torch.distributed's connections, say) cannot land on it."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def terminate(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited after `timeout` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class LocalServer:
    """`lathe serve` on 127.0.0.1, started exactly as a user would start it."""

    def __init__(
        self, models: dict[str, Path], data_dir: Path, *extra_args: str, dev: bool = True
    ) -> None:
        """dev=True: local mode, any tml- key (LOCAL_API_KEY) is the one local user."""
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            sys.executable,
            "-m",
            "lathe",
            "serve",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            *(["--dev"] if dev else []),
            *extra_args,
        ]
        for name, path in models.items():
            args += ["--model", f"{name}={path}"]
        self.log_path = self.data_dir / f"server-{self.port}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, env=os.environ.copy()
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        url = f"{self.base_url}/api/v1/healthz"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lathe serve exited:\n{self.log_path.read_text()}")
            try:
                # Any HTTP answer (401 without dev mode) means the server is up.
                httpx.get(url, headers={"X-API-Key": LOCAL_API_KEY})
                return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(
            f"lathe serve did not start in {timeout:.0f} s:\n{self.log_path.read_text()}"
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        terminate(self.proc, timeout=20)
        self._log.close()

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class LocalEngine:
    """`lathe engine --listen tcp://127.0.0.1:PORT`, the engine service API replicas share
    (`LocalServer(..., "--engine", engine.address)`); `launcher` starts it some other way,
    e.g. as one node of a torchrun group (`[".../torchrun", "--nnodes", "2", ..., "-m"]`)."""

    def __init__(
        self,
        models: dict[str, Path],
        data_dir: Path,
        *extra_args: str,
        address: str | None = None,
        launcher: list[str] | None = None,
        log_name: str = "engine.log",
    ) -> None:
        self.address = address or f"tcp://127.0.0.1:{free_port()}"
        args = [*(launcher or [sys.executable, "-m"]), "lathe", "engine", "--listen", self.address]
        args += ["--data-dir", str(data_dir), *extra_args]
        for name, path in models.items():
            args += ["--model", f"{name}={path}"]
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        self.log_path = Path(data_dir) / log_name
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)

    def stop(self) -> int:
        """Stop it as a user would (SIGTERM); its exit code."""
        terminate(self.proc, timeout=30)
        self._log.close()
        return self.proc.returncode
