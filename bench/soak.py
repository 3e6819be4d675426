"""Soak: many SDK clients for minutes of mixed work against one `lathe serve` on 127.0.0.1.

Each client (a thread with its own ServiceClient and training run) repeats, until the time is
up, a random one of:

- sft         forward_backward (cross_entropy) + optim_step
- rl          sample 4 sequences, forward_backward (importance_sampling) on them, optim_step
- prefix      sample 4 sequences of a prompt the client's other samples share (prefix cache)
- checkpoint  save_state, load it into a training client of a new session (closed after),
              delete it half of the time
- rest        list training runs and the run's checkpoints

It reports errors by kind, p50/p99 latency per kind, the server's memory (API process and
engine process together) after warm-up and at the end, futures left pending in the database,
and whether every checkpoint it kept still matches its recorded sha256 and loads.

    python bench/soak.py [--clients 16] [--minutes 10] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

from lathe.local_server import LOCAL_API_KEY, LocalServer
from lathe.store import checkpoint_files, tinker_paths
from lathe.testing.tiny_models import make_tiny

NAME = "soak-tiny"
KINDS = {"sft": 4, "rl": 3, "prefix": 2, "checkpoint": 1, "rest": 2}  # relative frequency
WARM_UP = 0.2  # of the run: memory is measured from its end


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its children (the engine runs in a child)."""
    total = 0
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(x for x in status.splitlines() if x.startswith("VmRSS")).split()[1])
            # children are listed per thread (the engine is started from one of the API's)
            children = [c for t in Path(f"/proc/{p}/task").iterdir() for c in
                        (t / "children").read_text().split()]  # fmt: skip
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
        pids += [int(c) for c in children]
    return total * 1024


class Client(threading.Thread):
    def __init__(self, index: int, base_url: str, deadline: float, seed: int) -> None:
        super().__init__(name=f"soak-{index}", daemon=True)
        self.base_url, self.deadline, self.rng = base_url, deadline, random.Random(seed)
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, int] = defaultdict(int)
        self.examples: list[str] = []
        self.kept: list[str] = []  # checkpoints saved and not deleted

    def run(self) -> None:
        import tinker
        from tinker import types

        self.types = types
        with tinker.ServiceClient(base_url=self.base_url, api_key=LOCAL_API_KEY) as service:
            self.service = service
            self.rest_client = tinker.RestClient(base_url=self.base_url, api_key=LOCAL_API_KEY)
            self.training = service.create_lora_training_client(base_model=NAME, rank=4).result()
            self.sampler = self.training.save_weights_and_get_sampling_client().result()
            self.shared_prompt = [self.rng.randrange(3, 400) for _ in range(48)]
            kinds, weights = zip(*KINDS.items(), strict=True)
            while time.monotonic() < self.deadline:
                kind = self.rng.choices(kinds, weights)[0]
                began = time.perf_counter()
                try:
                    getattr(self, f"do_{kind}")()
                except Exception as e:  # counted, and the client goes on
                    self.errors[f"{kind}: {type(e).__name__}"] += 1
                    if len(self.examples) < 3:
                        self.examples.append(traceback.format_exc(limit=2))
                    continue
                self.latency[kind].append(time.perf_counter() - began)

    def datum(self, tokens: list[int], **inputs: Any):  # noqa: ANN202
        t = self.types
        return t.Datum(
            model_input=t.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], **inputs},
        )

    def step(self, data: list, loss: str) -> None:
        fb = self.training.forward_backward(data, loss)
        opt = self.training.optim_step(self.types.AdamParams(learning_rate=1e-3))
        fb.result()
        opt.result()

    def do_sft(self) -> None:
        rows = [[self.rng.randrange(3, 400) for _ in range(self.rng.randrange(16, 96))]]
        self.step([self.datum(r) for r in rows * 2], "cross_entropy")

    def do_rl(self) -> None:
        t = self.types
        prompt = [self.rng.randrange(3, 400) for _ in range(16)]
        params = t.SamplingParams(max_tokens=12, temperature=1.0)
        out = self.sampler.sample(t.ModelInput.from_ints(prompt), 4, params).result()
        data = []
        for seq in out.sequences:
            if not seq.tokens:
                continue
            tokens = prompt + seq.tokens
            n = len(prompt) - 1
            data.append(
                self.datum(
                    tokens,
                    logprobs=[0.0] * n + list(seq.logprobs),
                    advantages=[0.0] * n + [self.rng.uniform(-1, 1)] * len(seq.tokens),
                )
            )
        if data:
            self.step(data, "importance_sampling")
        if self.rng.random() < 0.2:  # new weights for the next samples
            self.sampler = self.training.save_weights_and_get_sampling_client().result()

    def do_prefix(self) -> None:
        t = self.types
        prompt = self.shared_prompt + [self.rng.randrange(3, 400) for _ in range(4)]
        params = t.SamplingParams(max_tokens=8, temperature=1.0)
        self.sampler.sample(t.ModelInput.from_ints(prompt), 4, params).result()

    def do_checkpoint(self) -> None:
        import tinker

        path = self.training.save_state(f"soak-{time.monotonic_ns()}").result().path
        # loaded in a session of its own, ended after: its training run is freed again
        with tinker.ServiceClient(base_url=self.base_url, api_key=LOCAL_API_KEY) as other:
            loaded = other.create_training_client_from_state(path).result()
            loaded.forward_backward([self.datum(list(range(3, 20)))], "cross_entropy").result()
        if self.rng.random() < 0.5:
            self.rest_client.delete_checkpoint_from_tinker_path(path).result()
        else:
            self.kept.append(path)

    def do_rest(self) -> None:
        self.rest_client.list_training_runs().result()
        self.rest_client.list_checkpoints(self.training.model_id).result()


def pending_futures(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "lathe.db") as db:
        return db.execute("SELECT count(*) FROM futures WHERE status = 'pending'").fetchone()[0]


def soak(clients: int, seconds: float, work: Path) -> dict[str, Any]:
    model = make_tiny(work / "model")
    data_dir = work / "data"
    with LocalServer({NAME: model}, data_dir) as srv:
        deadline = time.monotonic() + seconds
        threads = [Client(i, srv.base_url, deadline, seed=i) for i in range(clients)]
        for t in threads:
            t.start()
        time.sleep(seconds * WARM_UP)
        rss_warm = rss_bytes(srv.proc.pid)
        for t in threads:
            t.join(timeout=seconds + 300)
        rss_end = rss_bytes(srv.proc.pid)
        time.sleep(2)  # results in flight reach the database
        pending = pending_futures(data_dir)
        kept = [p for t in threads for p in t.kept]
        damaged = [p for p in kept if checkpoint_files.verify(checkpoint_dir(data_dir, p))]
        loads = check_loads(srv.base_url, kept[:8])
        alive = srv.alive()
    latency: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    for t in threads:
        for k, v in t.latency.items():
            latency[k] += v
        for k, v in t.errors.items():
            errors[k] += v
    return {
        "clients": clients,
        "seconds": seconds,
        "requests": {k: len(v) for k, v in latency.items()},
        "errors": dict(errors),
        "error_examples": [e for t in threads for e in t.examples][:5],
        "latency_s": {
            k: {"p50": statistics.median(v), "p99": quantile(v, 0.99)} for k, v in latency.items()
        },
        "rss_after_warm_up_bytes": rss_warm,
        "rss_end_bytes": rss_end,
        "rss_growth": rss_end / rss_warm - 1,
        "pending_futures": pending,
        "checkpoints_kept": len(kept),
        "checkpoints_damaged": damaged,
        "checkpoints_that_failed_to_load": loads,
        "server_alive": alive,
        "stuck_clients": sum(t.is_alive() for t in threads),
    }


def checkpoint_dir(data_dir: Path, path: str) -> Path:
    tp = tinker_paths.parse(path)
    return tinker_paths.checkpoint_dir(data_dir / "checkpoints", tp.model_id, tp.kind, tp.name)


def check_loads(base_url: str, paths: list[str]) -> list[str]:
    import tinker

    failed = []
    with tinker.ServiceClient(base_url=base_url, api_key=LOCAL_API_KEY) as service:
        for path in paths:
            try:
                service.create_training_client_from_state(path).result()
            except Exception:
                failed.append(path)
    return failed


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    with tempfile.TemporaryDirectory() as tmp:
        result = soak(args.clients, args.minutes * 60, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.clients} clients x {args.minutes:g} min on {os.cpu_count()} cores")
    print(f"{'kind':12} {'requests':>9} {'p50 s':>8} {'p99 s':>8}")
    for kind, n in sorted(result["requests"].items()):
        lat = result["latency_s"][kind]
        print(f"{kind:12} {n:9d} {lat['p50']:8.3f} {lat['p99']:8.3f}")
    for key in (
        "errors",
        "rss_after_warm_up_bytes",
        "rss_end_bytes",
        "rss_growth",
        "pending_futures",
        "checkpoints_kept",
        "checkpoints_damaged",
        "checkpoints_that_failed_to_load",
        "server_alive",
        "stuck_clients",
    ):
        print(f"{key}: {result[key]}")


if __name__ == "__main__":
    main()
