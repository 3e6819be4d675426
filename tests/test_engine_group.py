"""`lathe serve --ranks 2`: the engine as a torch.distributed group (gloo on the CPU) whose
ranks each hold half of the base model's weights (FSDP2), and give the same numbers as one
rank: losses, greedy tokens, and checkpoints either can load."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from lathe.engine.group import decode_step, encode_step, with_seeds
from lathe.engine.scheduler import Step
from lathe.local_server import LOCAL_API_KEY, LocalEngine, LocalServer, free_port
from lathe.protocol import messages as m

TOKENS = np.random.default_rng(0).integers(3, 400, 40).tolist()
DATUM = types.Datum(
    model_input=types.ModelInput.from_ints(TOKENS[:-1]),
    loss_fn_inputs={"target_tokens": TOKENS[1:]},
)
# datums of several lengths: two ranks split them (data parallel), each taking its share
BATCH = [
    types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[i : i + n - 1]),
        loss_fn_inputs={"target_tokens": TOKENS[i + 1 : i + n]},
    )
    for i, n in ((0, 30), (3, 9), (5, 21), (1, 5), (2, 17))
]


def train_and_sample(srv: LocalServer) -> dict:
    """A seeded job: forward_backward, optim_step, forward, greedy sample, save_state."""
    with tinker.ServiceClient(base_url=srv.base_url, api_key=LOCAL_API_KEY) as sc:
        tc = sc.create_lora_training_client(base_model="tiny-qwen3", rank=4, seed=0).result()
        first = tc.forward_backward([DATUM], "cross_entropy").result().metrics["loss:sum"]
        # gradients accumulate over calls: the group sums each call's across its ranks
        batch = tc.forward_backward(BATCH, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        after = tc.forward([DATUM], "cross_entropy").result().metrics["loss:sum"]
        after_batch = tc.forward(BATCH, "cross_entropy").result()
        sampler = tc.save_weights_and_get_sampling_client().result()
        greedy = types.SamplingParams(max_tokens=8, temperature=0.0)
        out = sampler.sample(types.ModelInput.from_ints(TOKENS[:10]), 1, greedy).result()
        # unseeded samples: rank 0 draws their seeds, so the ranks stay in step
        free = types.SamplingParams(max_tokens=6, temperature=1.0)
        futures = [sampler.sample(types.ModelInput.from_ints(TOKENS[:5]), 2, free) for _ in "ab"]
        assert all(1 <= len(s.tokens) <= 6 for f in futures for s in f.result().sequences)
        path = tc.save_state("shared").result().path
    status = httpx.get(f"{srv.base_url}/api/v1/status", headers={"X-API-Key": LOCAL_API_KEY})
    return {
        "first": first,
        "after": after,
        "batch_loss": batch.metrics["loss:sum"],
        "batch_logprobs": [o["logprobs"].tolist() for o in batch.loss_fn_outputs],
        "after_batch": [o["logprobs"].tolist() for o in after_batch.loss_fn_outputs],
        "tokens": out.sequences[0].tokens,
        "path": path,
        "group": status.json().get("group"),
    }


def same_batch_numbers(two: dict, one: dict) -> None:
    """The batch split across ranks gives one rank's loss and per-datum logprobs, in order."""
    assert two["batch_loss"] == pytest.approx(one["batch_loss"], rel=1e-5)
    for key in ("batch_logprobs", "after_batch"):
        assert [len(x) for x in two[key]] == [len(x) for x in one[key]] == [29, 8, 20, 4, 16]
        for a, b in zip(two[key], one[key], strict=True):
            assert np.allclose(a, b, rtol=1e-5, atol=1e-6)


def loss_after_loading(srv: LocalServer, path: str) -> float:
    with tinker.ServiceClient(base_url=srv.base_url, api_key=LOCAL_API_KEY) as sc:
        tc = sc.create_training_client_from_state(path).result()
        return tc.forward([DATUM], "cross_entropy").result().metrics["loss:sum"]


@pytest.mark.slow
def test_two_ranks_hold_half_the_weights_and_give_one_ranks_numbers(tiny_qwen3, tmp_path):
    models = {"tiny-qwen3": tiny_qwen3}
    with LocalServer(models, tmp_path / "one") as srv:
        one = train_and_sample(srv)
    with LocalServer(models, tmp_path / "two", "--ranks", "2") as srv:
        two = train_and_sample(srv)
        # and a checkpoint saved by one rank loads on two
        one_path = one["path"]
    assert one["group"] is None
    per_rank = two["group"]["base_parameters_per_rank"]
    assert two["group"]["ranks"] == 2 and len(per_rank) == 2
    total = sum(per_rank)
    assert all(abs(n - total / 2) <= 0.01 * total for n in per_rank)  # about half each
    assert two["first"] == pytest.approx(one["first"], rel=1e-5)
    assert two["after"] == pytest.approx(one["after"], rel=1e-5)
    same_batch_numbers(two, one)
    assert two["tokens"] == one["tokens"]
    # checkpoints are interchangeable: the group's loads on one rank and the other way round
    with LocalServer(models, tmp_path / "two") as srv:
        assert loss_after_loading(srv, two["path"]) == pytest.approx(one["after"], rel=1e-5)
    with LocalServer(models, tmp_path / "one", "--ranks", "2") as srv:
        assert loss_after_loading(srv, one_path) == pytest.approx(two["after"], rel=1e-5)


@pytest.mark.slow
def test_torchrun_starts_a_group_across_two_nodes_that_serves_replicas(tiny_qwen3, tmp_path):
    """The README's two-node command lines, both nodes on this machine: `lathe engine` under
    torchrun, rank 0 serving an API replica; the same numbers as one rank. Every micro-batch
    recomputes its layers in the backward pass here (FSDP2 with activation checkpointing)."""
    models = {"tiny-qwen3": tiny_qwen3}
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    port, address = free_port(), f"tcp://127.0.0.1:{free_port()}"
    nodes = [
        LocalEngine(
            models,
            tmp_path / "group",
            "--checkpoint-activations-above",
            "0",
            address=address,
            launcher=[torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
                      str(node), "--master-addr", "127.0.0.1", "--master-port", str(port), "-m"],
            log_name=f"node{node}.log",
        )
        for node in (0, 1)
    ]  # fmt: skip
    try:
        with LocalServer(models, tmp_path / "group", "--engine", address) as replica:
            two = train_and_sample(replica)
    finally:
        for node in nodes:
            node.stop()  # torchrun passes SIGTERM on to its ranks (and exits 1 itself)
    for rank, node in enumerate(nodes):
        assert f"engine rank {rank} of 2" in node.log_path.read_text()
    with LocalServer(models, tmp_path / "one") as srv:
        one = train_and_sample(srv)
    assert two["group"]["ranks"] == 2
    per_rank = two["group"]["base_parameters_per_rank"]
    assert per_rank[0] == per_rank[1] and sum(per_rank) > 0
    assert two["first"] == pytest.approx(one["first"], rel=1e-5)
    assert two["after"] == pytest.approx(one["after"], rel=1e-5)
    same_batch_numbers(two, one)
    assert two["tokens"] == one["tokens"]


def test_each_rank_takes_a_contiguous_token_balanced_run_of_every_request():
    from lathe.engine.data_parallel import merge, share
    from lathe.engine.forward_backward import Job

    def job(lengths: list[int]) -> Job:
        data = [m.Datum(list(range(n)), {}) for n in lengths]
        return Job(None, m.ForwardBackwardRequest("x", 1, data, "cross_entropy", {}, False))  # type: ignore[arg-type]

    jobs = [job([30, 9, 21, 5, 17]), job([4]), job([10, 10, 10, 10])]
    runs = [share(jobs, rank, 2) for rank in range(2)]
    for j, whole in enumerate(jobs):
        parts = [runs[rank][j].req.data for rank in range(2)]
        assert parts[0] + parts[1] == whole.req.data  # contiguous, in order, each datum once
    assert [len(d.tokens) for d in runs[1][0].req.data] == [21, 5, 17]  # 43 of 82 tokens
    assert sorted(len(r[1].req.data) for r in runs) == [0, 1]  # one datum: one rank has it
    assert [len(runs[rank][2].req.data) for rank in range(2)] == [2, 2]
    three = [share(jobs, rank, 3)[2].req.data for rank in range(3)]
    assert sum(three, []) == jobs[2].req.data and all(three)
    merged = merge([([{"a": 1}], {"loss:sum": 1.5}), ([{"a": 2}, {"a": 3}], {"loss:sum": 2.0})])
    assert merged == ([{"a": 1}, {"a": 2}, {"a": 3}], {"loss:sum": 3.5})


def test_rank_zero_draws_every_seed_and_steps_cross_intact():
    params = m.SamplingParams(max_tokens=3, temperature=1.0)
    create = m.Work("c", m.CreateModelRequest("s:train:0", "base", m.LoraConfig(rank=4), None))
    seeded = m.Work("d", m.CreateModelRequest("s:train:1", "base", m.LoraConfig(rank=4), 7))
    sample = m.Work("s", m.SampleRequest("sampler", [1, 2, 3], 2, params, False))
    step = with_seeds(Step(batch=[create, seeded], admit=[sample], decode=True))
    assert step.batch[0].request.seed is not None
    assert step.batch[1].request.seed == 7  # a client's seed is kept
    assert step.admit[0].request.params.seed is not None
    again = decode_step(encode_step(step))
    assert again == step


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid`."""
    from pathlib import Path

    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return found


@pytest.mark.slow
def test_a_rank_that_dies_takes_the_group_down_and_the_api_restarts_it(tiny_qwen3, tmp_path):
    import os
    import signal
    import time

    with LocalServer({"tiny-qwen3": tiny_qwen3}, tmp_path, "--ranks", "2") as srv:
        with tinker.ServiceClient(base_url=srv.base_url, api_key=LOCAL_API_KEY) as sc:
            tc = sc.create_lora_training_client(base_model="tiny-qwen3", rank=4, seed=0).result()
            tc.forward_backward([DATUM], "cross_entropy").result()
        (engine,) = children(srv.proc.pid)
        (rank1,) = children(engine)
        os.kill(rank1, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while True:  # rank 0 notices, exits; the API starts a new group
            status = httpx.get(
                f"{srv.base_url}/api/v1/status", headers={"X-API-Key": LOCAL_API_KEY}
            ).json()
            engine_state = status["engine"]
            if engine_state["restarts"] >= 1 and engine_state["state"] == "running":
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        assert len(children(srv.proc.pid)) == 1 and len(children(children(srv.proc.pid)[0])) == 1
        with tinker.ServiceClient(base_url=srv.base_url, api_key=LOCAL_API_KEY) as sc:
            tc = sc.create_lora_training_client(base_model="tiny-qwen3", rank=4, seed=0).result()
            fb = tc.forward_backward([DATUM], "cross_entropy").result()
            assert fb.metrics["loss:sum"] > 0
